"""Token-budget scheduling: what runs in the next step.

Each step packs at most ``token_budget`` tokens: every running decode first (one token
each), then prefill chunks of running requests, then new requests admitted in the order
they were submitted (the plan order). A long prompt is spread over several steps.

Admission is limited by KV memory only, never by a sequence count: a request is admitted
when the blocks it could ever need (prompt + ``max_tokens``) fit beside what the running
requests have reserved. Blocks themselves are allocated as tokens arrive, so a reservation
costs nothing until it is used, and the pool can never run dry mid-step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from batchrun.core.kv_cache import BlockPool, KVCacheSpec
from batchrun.core.request import Request


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    num_tokens: int  # tokens computed this step, starting at request.num_computed_tokens
    samples: bool  # the chunk completes the request's pending tokens, so a token is sampled


@dataclass(frozen=True)
class StepBatch:
    chunks: list[ScheduledChunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, pool: BlockPool, spec: KVCacheSpec, token_budget: int) -> None:
        self.pool = pool
        self.spec = spec
        self.token_budget = token_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.num_reserved = 0  # sum of reserved_blocks over running requests

    def can_ever_fit(self, request: Request) -> bool:
        return self.spec.blocks_for(request.max_total_tokens) <= self.pool.num_blocks

    def add(self, request: Request) -> None:
        if not self.can_ever_fit(request):
            raise ValueError("request can never fit in the KV cache; check can_ever_fit first")
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepBatch:
        budget = self.token_budget
        chunks: list[ScheduledChunk] = []
        # Decodes first (one pending token), then unfinished prefills, oldest first.
        for request in sorted(self.running, key=lambda r: r.num_pending_tokens > 1):
            if budget == 0:
                break
            n = min(request.num_pending_tokens, budget)
            chunks.append(self._chunk(request, n))
            budget -= n
        while budget > 0 and self.waiting and self._admissible(self.waiting[0]):
            request = self.waiting.popleft()
            request.reserved_blocks = self.spec.blocks_for(request.max_total_tokens)
            self.num_reserved += request.reserved_blocks
            self.running.append(request)
            n = min(request.num_pending_tokens, budget)
            chunks.append(self._chunk(request, n))
            budget -= n
        return StepBatch(chunks)

    def finish(self, request: Request) -> None:
        """Remove a finished request and release its blocks and its reservation."""
        self.running.remove(request)
        self.pool.release(request.block_ids)
        request.block_ids = []
        self.num_reserved -= request.reserved_blocks
        request.reserved_blocks = 0

    def _admissible(self, request: Request) -> bool:
        need = self.spec.blocks_for(request.max_total_tokens)
        return self.num_reserved + need <= self.pool.num_blocks

    def _chunk(self, request: Request, num_tokens: int) -> ScheduledChunk:
        needed = self.spec.blocks_for(request.num_computed_tokens + num_tokens)
        while len(request.block_ids) < needed:
            request.block_ids.append(self.pool.allocate())
        return ScheduledChunk(request, num_tokens, samples=num_tokens == request.num_pending_tokens)
