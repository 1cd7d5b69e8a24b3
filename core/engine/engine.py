"""The engine: takes requests in plan order and yields each one's completion as it finishes.

while work remains:
    batch  = scheduler.schedule()        # decodes + prefill chunks within the token budget
    logits = runner.execute(batch)       # one forward pass over the packed tokens
    tokens = sample(logits, ...)         # one token per request that completed its pending tokens
    scheduler.computed(batch)            # advance requests and the shared segments they write
    yield from finished(...)             # EOS, stop string or max_tokens
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.stop import StopChecker
from batchrun.core.runner.kv_budget import kv_cache_bytes, num_blocks_for
from batchrun.core.runner.kv_cache import BlockPool, KVCache, KVCacheSpec
from batchrun.core.runner.model_loader import LoadedModel
from batchrun.core.runner.model_runner import ModelRunner
from batchrun.core.runner.sampler import sample, token_logprobs
from batchrun.core.sched.request import Request
from batchrun.core.sched.scheduler import Scheduler, StepBatch
from batchrun.core.sched.shared_prefix import SharedPrefixes
from batchrun.kernels import get_backend


@dataclass(frozen=True)
class Completion:
    request_id: int
    token_ids: list[int]  # generated tokens, including a final EOS if one was sampled
    text: str  # decoded output, without EOS and cut before a matched stop string
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    sample_index: int = 0
    cached_tokens: int = 0  # prompt tokens read from shared blocks another request computed
    logprobs: list[dict] | None = None  # per token, when the request asked for them


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0  # over all requests (a row sampled n times counts n times)
    prefill_tokens: int = 0  # prompt positions computed, recomputation after preemption included
    decode_tokens: int = 0  # positions after the prompt computed
    cached_prompt_tokens: int = 0  # prompt positions read from shared blocks instead
    finished_prompt_tokens: int = 0  # prompt tokens of the requests finished so far
    steps: int = 0
    preemptions: int = 0
    peak_blocks: int = 0
    num_blocks: int = 0
    block_size: int = 0
    seconds: float = 0.0  # wall time of the generation loop

    @property
    def saving(self) -> float:
        """Share of prompt tokens not computed: 1 - prefill_tokens / prompt_tokens."""
        return 1.0 - self.prefill_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def live_saving(self) -> float:
        """The saving over the requests finished so far (for progress reports)."""
        done = self.finished_prompt_tokens
        return self.cached_prompt_tokens / done if done else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return (self.prefill_tokens + self.decode_tokens) / max(self.steps, 1)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, float | int]:
        fields = dict(self.__dict__)
        return fields | {
            "saving": self.saving,
            "mean_tokens_per_step": self.mean_tokens_per_step,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        spec: KVCacheSpec,
        token_budget: int,
        stop_checker: StopChecker,
        reserve_full: bool = False,
    ) -> None:
        self.runner = runner
        self.pool = BlockPool(runner.kv_cache.num_blocks)
        self.prefixes = SharedPrefixes(self.pool)
        self.scheduler = Scheduler(self.pool, spec, token_budget, self.prefixes, reserve_full)
        self.stop_checker = stop_checker
        self.stats = EngineStats(num_blocks=self.pool.num_blocks, block_size=spec.block_size)

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Run ``requests`` (admitted in the given order); yield completions as they finish.

        Requests listing the same segment key share that prefix's KV blocks; every user of
        a segment must be in ``requests`` (its blocks live until the last one finishes)."""
        start = time.perf_counter()
        requests = list(requests)
        for request in requests:
            for ref in request.segments:
                self.prefixes.register(*ref)
        for request in requests:
            self.stats.requests += 1
            self.stats.prompt_tokens += request.prompt_len
            if self.scheduler.can_ever_fit(request):
                self.scheduler.add(request)
            else:
                self.scheduler.drop(request)
                yield self._too_large(request)
        while self.scheduler.has_work:
            batch = self.scheduler.schedule()
            logits = self.runner.execute(batch)
            sampling = [c.request for c in batch.chunks if c.samples]
            tokens = sample(logits, sampling)
            self._record_logprobs(logits, sampling, tokens)
            self._account(batch)
            self.scheduler.computed(batch)
            yield from self._finished(sampling, tokens)
        self.stats.peak_blocks = self.pool.peak_used
        self.stats.preemptions = self.scheduler.num_preemptions
        self.stats.seconds += time.perf_counter() - start

    def _finished(self, sampling: list[Request], tokens: list[int]) -> Iterator[Completion]:
        for request, token in zip(sampling, tokens, strict=True):
            request.output_ids.append(token)
            verdict = self.stop_checker.check(request)
            if verdict is None:
                continue
            self.scheduler.finish(request)
            self.stats.cached_prompt_tokens += request.cached_tokens
            self.stats.finished_prompt_tokens += request.prompt_len
            yield Completion(
                request.request_id,
                request.output_ids,
                verdict.text,
                verdict.reason,
                sample_index=request.sample_index,
                cached_tokens=request.cached_tokens,
                logprobs=request.logprobs if request.params.logprobs is not None else None,
            )

    def _record_logprobs(self, logits: torch.Tensor, sampling: list[Request], tokens: list[int]) -> None:
        rows = [i for i, r in enumerate(sampling) if r.params.logprobs is not None]
        if not rows:
            return
        top = max(sampling[i].params.logprobs for i in rows)
        chosen = [tokens[i] for i in rows]
        for i, entry in zip(rows, token_logprobs(logits[rows], chosen, top), strict=True):
            k = sampling[i].params.logprobs
            sampling[i].logprobs.append(entry | {"top": entry["top"][:k]})

    def _account(self, batch: StepBatch) -> None:
        self.stats.steps += 1
        for chunk in batch.chunks:
            start = chunk.request.num_computed_tokens
            in_prompt = max(0, min(start + chunk.num_tokens, chunk.request.prompt_len) - start)
            self.stats.prefill_tokens += in_prompt
            self.stats.decode_tokens += chunk.num_tokens - in_prompt

    def _too_large(self, request: Request) -> Completion:
        capacity = self.pool.num_blocks * self.scheduler.spec.block_size
        message = (
            f"prompt ({request.prompt_len} tokens) + max_tokens ({request.params.max_tokens}) "
            f"needs more KV cache than the whole pool ({capacity} tokens); "
            "lower max_tokens or give the job more KV memory (--kv-memory)"
        )
        return Completion(request.request_id, [], "", "error", message, sample_index=request.sample_index)


def build_engine(loaded: LoadedModel, config: EngineConfig, useful_tokens: int | None = None) -> Engine:
    """Size the KV cache for ``loaded`` within the budget and wire up an engine.

    ``useful_tokens`` (the sum of prompt + max_tokens over the job) caps the cache, so a
    small job does not allocate gigabytes it can never touch.
    """
    spec = KVCacheSpec.from_config(loaded.model.config, loaded.dtype, config.block_size)
    budget = kv_cache_bytes(loaded.device, config.kv_cache_bytes)
    kv_cache = KVCache(spec, num_blocks_for(spec, budget, useful_tokens), loaded.device)
    runner = ModelRunner(loaded.model, kv_cache, get_backend(config.attention_backend))
    stop_checker = StopChecker(loaded.tokenizer, loaded.eos_token_ids)
    return Engine(runner, spec, config.token_budget, stop_checker, config.reserve_full)
