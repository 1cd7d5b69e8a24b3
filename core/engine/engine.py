"""The engine: takes requests in plan order and yields each one's completion as it finishes.

while work remains:
    plan   = scheduler.schedule()     # decodes + prefill chunks within the token budget
    result = runner.execute(plan)     # one forward pass; a token per chunk that completes
    scheduler.computed(plan)          # advance requests and the shared segments they write
    yield from finished(result)       # EOS, stop string or max_tokens

The scheduler and the runner only exchange messages (sched/messages.py), so the runner
could live in another process; the requests themselves stay on this side.

Requests are taken from their iterator lazily: before each step the waiting queue is topped
up to ``SchedulerConfig.lookahead`` requests, the furthest a step's admission can look, so
admission decides exactly as if every request had been queued at the start, while at most
that many requests wait in memory (a million-row job never holds a million ``Request``s).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import torch

from batchrun.core.engine.backend_choice import choose_backend
from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.stats import Completion, EngineInfo, EngineStats
from batchrun.core.engine.stop import StopChecker, StopState
from batchrun.core.runner.cuda_graphs import graph_memory_bytes
from batchrun.core.runner.host_allocator import keep_freed_host_memory
from batchrun.core.runner.kv_budget import kv_cache_bytes, num_blocks_for
from batchrun.core.runner.kv_cache import KVCache, KVCacheSpec
from batchrun.core.runner.layer_overrides import cpu_layer_overrides
from batchrun.core.runner.model_loader import LoadedModel
from batchrun.core.runner.model_runner import ModelRunner
from batchrun.core.sched.block_pool import BlockPool
from batchrun.core.sched.kv_manager import KVManager
from batchrun.core.sched.messages import StepPlan, StepResult
from batchrun.core.sched.request import Request
from batchrun.core.sched.scheduler import Scheduler
from batchrun.kernels import AttentionBackend


class Engine:
    def __init__(
        self, runner: ModelRunner, config: EngineConfig, stop_checker: StopChecker, backend_choice: str = ""
    ) -> None:
        config = config.for_device(runner.device.type)  # the token budget, per device
        self.runner = runner
        self.kv = KVManager(BlockPool(runner.kv_cache.num_blocks), config.block_size)
        self.scheduler = Scheduler(self.kv, config.scheduler_config())
        self.stop_checker = stop_checker
        self.stats = EngineStats(num_blocks=runner.kv_cache.num_blocks, block_size=config.block_size)
        spec = runner.kv_cache.spec
        self.info = EngineInfo(
            device=str(runner.device),
            dtype=str(spec.dtype).removeprefix("torch."),
            attention_backend=runner.backend.name,
            attention_backend_choice=backend_choice,
            block_size=spec.block_size,
            num_blocks=runner.kv_cache.num_blocks,
            kv_cache_bytes=runner.kv_cache.num_blocks * spec.bytes_per_block,
            token_budget=config.token_budget,
        )
        self._stops: dict[int, StopState] = {}

    def generate(
        self,
        requests: Iterable[Request],
        on_step: Callable[[EngineStats], None] | None = None,
        segment_users: Callable[[int], int] | None = None,
    ) -> Iterator[Completion]:
        """Run ``requests`` (admitted in the given order); yield completions as they finish.
        ``on_step`` gets the running statistics after every step.

        Requests listing the same segment key share that prefix's KV blocks, which live until
        the segment's last user finishes. ``segment_users(key)`` says how many of
        ``requests`` list each key; with it, requests are taken from the iterator only as the
        scheduler has room for them. Without it, every request is taken at the start (to
        count them) and the iterator may be anything."""
        start = time.perf_counter()
        if segment_users is None:
            requests = list(requests)
            counts = Counter(ref.key for request in requests for ref in request.segments)
            segment_users = counts.__getitem__
        self.kv.announce(segment_users)
        pending = iter(requests)
        while True:
            yield from self._take(pending, self.scheduler.config.lookahead)
            if not self.scheduler.has_work:
                break
            plan = self.scheduler.schedule()
            result = self.runner.execute(plan)
            self._account(plan)
            if (graphs := self.runner.graphs) is not None:
                self.stats.graph_steps, self.stats.cuda_graphs = graphs.replays, len(graphs.graphs)
            self.stats.sampled_tokens += len(result.token_ids)
            self.scheduler.computed(plan)
            if on_step is not None:
                on_step(self.stats)
            yield from self._finished(result)
        self.stats.peak_blocks = self.kv.pool.peak_used
        self.stats.preemptions = self.scheduler.num_preemptions
        self.stats.seconds += time.perf_counter() - start
        if self.kv.prefixes.segments:  # announced users that never came would pin blocks
            key, segment = next(iter(self.kv.prefixes.segments.items()))
            raise RuntimeError(
                f"segment {key} still waits for {segment.unfinished_users} user(s) after the last "
                f"request ({segment.registered} came); segment_users announced more than were given"
            )

    def _take(self, pending: Iterator[Request], lookahead: int) -> Iterator[Completion]:
        """Queue requests from ``pending`` until ``lookahead`` wait (or none are left); yield
        the error completion of each that can never fit in the KV cache."""
        while len(self.scheduler.waiting) < lookahead:
            request = next(pending, None)
            if request is None:
                return
            self.stats.requests += 1
            self.stats.prompt_tokens += request.prompt_len
            if self.scheduler.can_ever_fit(request):
                self.scheduler.add(request)
                if request.params.stop:
                    self._stops[request.req_id] = self.stop_checker.new_state()
            else:
                self.scheduler.drop(request)
                yield self._too_large(request)

    def _finished(self, result: StepResult) -> Iterator[Completion]:
        for req_id, token in zip(result.req_ids, result.token_ids, strict=True):
            request = self.scheduler.requests[req_id]
            request.output_ids.append(token)
            if req_id in result.logprobs:
                request.logprobs.append(self._with_text(result.logprobs[req_id]))
            verdict = self.stop_checker.check(request.params, request.output_ids, self._stops.get(req_id))
            if verdict is None:
                continue
            self.scheduler.finish(request)
            self._stops.pop(req_id, None)
            self.stats.cached_prompt_tokens += request.cached_tokens
            self.stats.finished_prompt_tokens += request.prompt_len
            yield Completion(
                request.row,
                request.output_ids,
                verdict.text,
                verdict.reason,
                sample_index=request.sample_index,
                cached_tokens=request.cached_tokens,
                logprobs=request.logprobs if request.params.logprobs is not None else None,
            )

    def _with_text(self, entry: dict) -> dict:
        """A logprobs entry with each token's text (as ``tokenizer.decode([id])`` gives it)."""
        decode = self.stop_checker.tokenizer.decode
        top = [t | {"text": decode([t["token"]])} for t in entry["top"]]
        return entry | {"text": decode([entry["token"]]), "top": top}

    def _account(self, plan: StepPlan) -> None:
        self.stats.steps += 1
        for chunk in plan.chunks:
            request = self.scheduler.requests[chunk.req_id]
            start = request.num_computed_tokens
            in_prompt = max(0, min(start + chunk.num_tokens, request.prompt_len) - start)
            self.stats.prefill_tokens += in_prompt
            self.stats.decode_tokens += chunk.num_tokens - in_prompt
        self.stats.kv_blocks_used = self.kv.pool.num_used

    def _too_large(self, request: Request) -> Completion:
        capacity = self.kv.pool.num_blocks * self.kv.block_size
        message = (
            f"prompt ({request.prompt_len} tokens) + max_tokens ({request.params.max_tokens}) "
            f"needs more KV cache than the whole pool ({capacity} tokens); "
            "lower max_tokens or give the job more KV memory (--kv-memory)"
        )
        return Completion(request.row, [], "", "error", message, sample_index=request.sample_index)


def build_engine(
    loaded: LoadedModel,
    config: EngineConfig,
    useful_tokens: int | None = None,
    backend: AttentionBackend | None = None,
) -> Engine:
    """Size the KV cache for ``loaded`` within the budget and wire up an engine.

    ``useful_tokens`` (the sum of prompt + max_tokens over the job) caps the cache, so a
    small job does not allocate gigabytes it can never touch. ``backend``, an attention
    backend built by the caller, replaces ``config.attention_backend`` (it must still
    support the model).
    """
    if loaded.device.type == "cuda" and loaded.device.index is not None:
        torch.cuda.set_device(loaded.device)  # Triton launches and CUDA graphs use the current one
    spec = KVCacheSpec.from_config(loaded.model.config, loaded.dtype, config.block_size)
    backend, why = choose_backend(config, loaded, spec, given=backend)
    graphs = loaded.device.type == "cuda" and config.cuda_graphs and backend.capabilities.cuda_graphs
    # Graphs hold GPU memory of their own from their first capture on; a share of free memory
    # leaves room for it (an explicit size in bytes is taken as given).
    kept_for_graphs = 0
    if graphs and not isinstance(config.kv_cache_bytes, int):
        kept_for_graphs = graph_memory_bytes(loaded.model.config, loaded.dtype)
    budget = kv_cache_bytes(loaded.device, config.kv_cache_bytes) - kept_for_graphs
    kv_cache = KVCache(spec, num_blocks_for(spec, budget, useful_tokens), loaded.device)
    overrides = cpu_layer_overrides(loaded.model) if backend.name == "cpu" else None
    if overrides:
        why += f"; {overrides.description}"
    if loaded.device.type == "cpu" and (kept := keep_freed_host_memory()):
        why += f"; {kept}"
    runner = ModelRunner(loaded.model, kv_cache, backend, loaded.eos_token_ids, overrides)
    if loaded.device.type == "cuda":
        why += f"; {_use_cuda_graphs(runner, config.cuda_graphs)}"
    if kept_for_graphs:
        why += f" (~{kept_for_graphs / 2**20:,.0f} MiB kept out of the KV cache for them)"
    stop_checker = StopChecker(loaded.tokenizer, loaded.eos_token_ids)
    return Engine(runner, config, stop_checker, backend_choice=why)


def _use_cuda_graphs(runner: ModelRunner, wanted: bool) -> str:
    """Turn the runner's CUDA graphs on where they can run; say what was done, for the log."""
    if not wanted:
        return "no CUDA graphs (--no-cuda-graphs)"
    if not runner.backend.capabilities.cuda_graphs:
        return f"no CUDA graphs (the {runner.backend.name} backend does not run in them)"
    return runner.use_graphs().describe()
