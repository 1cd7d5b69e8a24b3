"""The engine: takes requests in plan order and yields each one's completion as it finishes.

while work remains:
    batch  = scheduler.schedule()        # decodes + prefill chunks within the token budget
    logits = runner.execute(batch)       # one forward pass over the packed tokens
    tokens = sample(logits, ...)         # one token per request that completed its prompt
    yield from finished(...)             # EOS, stop string or max_tokens
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from batchrun.core.config import EngineConfig
from batchrun.core.kv_budget import kv_cache_bytes, num_blocks_for
from batchrun.core.kv_cache import BlockPool, KVCache, KVCacheSpec
from batchrun.core.model_loader import LoadedModel
from batchrun.core.model_runner import ModelRunner
from batchrun.core.request import Request
from batchrun.core.sampler import sample
from batchrun.core.scheduler import Scheduler, StepBatch
from batchrun.core.stop import StopChecker
from batchrun.kernels import get_backend


@dataclass(frozen=True)
class Completion:
    request_id: int
    token_ids: list[int]  # generated tokens, including a final EOS if one was sampled
    text: str  # decoded output, without EOS and cut before a matched stop string
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (not served from a cache)
    decode_tokens: int = 0
    peak_blocks: int = 0
    num_blocks: int = 0
    step_tokens: list[int] = field(default_factory=list, repr=False)

    @property
    def mean_tokens_per_step(self) -> float:
        return (self.prefill_tokens + self.decode_tokens) / max(self.steps, 1)


class Engine:
    def __init__(
        self, runner: ModelRunner, spec: KVCacheSpec, token_budget: int, stop_checker: StopChecker
    ) -> None:
        self.runner = runner
        self.pool = BlockPool(runner.kv_cache.num_blocks)
        self.scheduler = Scheduler(self.pool, spec, token_budget)
        self.stop_checker = stop_checker
        self.stats = EngineStats(num_blocks=self.pool.num_blocks)

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Run ``requests`` (admitted in the given order); yield completions as they finish."""
        for request in requests:
            if self.scheduler.can_ever_fit(request):
                self.scheduler.add(request)
            else:
                yield self._too_large(request)
        while self.scheduler.has_work:
            batch = self.scheduler.schedule()
            logits = self.runner.execute(batch)
            sampling = [c.request for c in batch.chunks if c.samples]
            tokens = sample(logits, sampling)
            self._account(batch)
            yield from self._advance(batch, dict(zip(map(id, sampling), tokens, strict=True)))
        self.stats.peak_blocks = self.pool.peak_used

    def _advance(self, batch: StepBatch, new_tokens: dict[int, int]) -> Iterator[Completion]:
        for chunk in batch.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            if id(request) not in new_tokens:
                continue  # a prefill chunk that did not reach the end of the prompt
            request.output_ids.append(new_tokens[id(request)])
            verdict = self.stop_checker.check(request)
            if verdict is not None:
                self.scheduler.finish(request)
                yield Completion(request.request_id, request.output_ids, verdict.text, verdict.reason)

    def _account(self, batch: StepBatch) -> None:
        self.stats.steps += 1
        for chunk in batch.chunks:
            if chunk.request.num_computed_tokens < len(chunk.request.prompt_ids):
                self.stats.prefill_tokens += chunk.num_tokens
            else:
                self.stats.decode_tokens += chunk.num_tokens

    def _too_large(self, request: Request) -> Completion:
        capacity = self.pool.num_blocks * self.scheduler.spec.block_size
        message = (
            f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.params.max_tokens}) "
            f"needs more KV cache than the whole pool ({capacity} tokens); "
            "lower max_tokens or give the job more KV memory"
        )
        return Completion(request.request_id, [], "", "error", message)


def build_engine(loaded: LoadedModel, config: EngineConfig, useful_tokens: int | None = None) -> Engine:
    """Size the KV cache for ``loaded`` within the budget and wire up an engine.

    ``useful_tokens`` (the sum of prompt + max_tokens over the job) caps the cache, so a
    small job does not allocate gigabytes it can never touch.
    """
    spec = KVCacheSpec.from_config(loaded.model.config, loaded.dtype, config.block_size)
    budget = kv_cache_bytes(loaded.device, config.kv_cache_bytes)
    kv_cache = KVCache(spec, num_blocks_for(spec, budget, useful_tokens), loaded.device)
    runner = ModelRunner(loaded.model, kv_cache, get_backend(config.attention_backend))
    return Engine(runner, spec, config.token_budget, StopChecker(loaded.tokenizer, loaded.eos_token_ids))
