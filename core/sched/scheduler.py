"""Memory-centric token batching: what runs in the next step.

Each step packs at most ``token_budget`` tokens: every running decode first (one token
each), then prefill chunks of running requests (Sarathi), then new requests admitted in
plan order. A long prompt spreads over several steps. There is no cap on the number of
sequences: admission is limited by KV memory only.

* **Blocks are allocated as tokens arrive.** A request is admitted while the free blocks
  cover every running request's *expected* growth plus its own. Expected output lengths
  come from the row's hint, else from the outputs observed so far, else ``max_tokens``.
  With ``reserve_full`` the expectation is always ``max_tokens`` and nothing is ever
  preempted.
* **Preemption by recompute.** If the pool runs dry anyway, the most recently admitted
  request is preempted: its own blocks are freed and it goes back to the front of the
  queue, to recompute prompt and output so far later (its sampled tokens are kept, so
  outputs do not change). Shared-prefix blocks stay: their segment holds them until its
  last user finishes (shared_prefix.py).
* **Shared prefixes are computed once.** A request whose segment is not yet computed
  becomes its writer; the segment's other users wait until it is complete, then attach to
  its blocks and start at its end. Admission skips past such waiting users (they are
  unblocked within a step or two) rather than leave the step half empty.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from batchrun.core.runner.kv_cache import BlockPool, KVCacheSpec
from batchrun.core.sched.request import Request
from batchrun.core.sched.shared_prefix import SharedPrefixes, SharedSegment

MIN_OBSERVED = 8  # finished requests before observed output lengths replace max_tokens
GROWTH_MARGIN = 1.5  # expected output = this x the observed mean (capped at max_tokens)
MAX_SKIPPED = 256  # waiting requests admission looks past when they wait for a segment


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
    def __init__(
        self,
        pool: BlockPool,
        spec: KVCacheSpec,
        token_budget: int,
        prefixes: SharedPrefixes | None = None,
        reserve_full: bool = False,
    ) -> None:
        self.pool = pool
        self.spec = spec
        self.token_budget = token_budget
        self.prefixes = prefixes or SharedPrefixes(pool)
        self.reserve_full = reserve_full
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.writing: dict[Request, list[SharedSegment]] = {}  # writers and their segments
        self.num_preemptions = 0
        self._finished_outputs = 0
        self._finished_count = 0

    # -- requests in and out ---------------------------------------------------------

    def can_ever_fit(self, request: Request) -> bool:
        return self.spec.blocks_for(request.max_total_tokens) <= self.pool.num_blocks

    def add(self, request: Request) -> None:
        """Queue a request; its segments must already be registered with ``prefixes``."""
        if not self.can_ever_fit(request):
            raise ValueError("request can never fit in the KV cache; check can_ever_fit first")
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Remove a finished request; free its blocks, and its segments after their last user."""
        self.running.remove(request)
        self._stop_writing(request)
        self.pool.release(request.block_ids)
        request.block_ids = []
        self.prefixes.user_finished(tuple(ref.key for ref in request.segments))
        self._finished_count += 1
        self._finished_outputs += len(request.output_ids)

    def drop(self, request: Request) -> None:
        """A request that will never run (it can never fit): release its segment uses."""
        self.prefixes.user_finished(tuple(ref.key for ref in request.segments))

    # -- one step ----------------------------------------------------------------------

    def schedule(self) -> StepBatch:
        budget = self.token_budget
        scheduled: dict[Request, int] = {}  # request -> tokens this step, in schedule order
        preempted: set[Request] = set()
        decodes = [r for r in self.running if r.num_pending_tokens == 1]
        prefills = [r for r in self.running if r.num_pending_tokens > 1]
        for request in decodes + prefills:
            if budget == 0:
                break
            if request in preempted:
                continue
            n = min(request.num_pending_tokens, budget)
            for victim in self._make_room(request, n):
                preempted.add(victim)
                budget += scheduled.pop(victim, 0)
            if request in preempted:
                continue
            self._allocate(request, n)
            scheduled[request] = n
            budget -= n
        if not preempted:  # no memory to spare for newcomers in a step that preempted
            budget = self._admit(budget, scheduled)
        if not scheduled and self.has_work:
            raise RuntimeError(
                f"no request can run: {len(self.waiting)} waiting, {len(self.running)} running, "
                f"{self.pool.num_free}/{self.pool.num_blocks} KV blocks free"
            )
        chunks = [ScheduledChunk(r, n, samples=n == r.num_pending_tokens) for r, n in scheduled.items()]
        return StepBatch(chunks)

    def computed(self, batch: StepBatch) -> None:
        """Record that the step ran: advance each request and the segments it writes."""
        for chunk in batch.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            segments = self.writing.get(request)
            if not segments:
                continue
            for segment in segments:
                segment.computed = max(segment.computed, min(request.num_computed_tokens, segment.end))
            if segments[-1].complete:
                self._stop_writing(request)

    # -- admission ---------------------------------------------------------------------

    def _admit(self, budget: int, scheduled: dict[Request, int]) -> int:
        free = self.pool.num_free - sum(self._future_blocks(r) for r in self.running)
        skipped: list[Request] = []
        while budget > 0 and self.waiting and len(skipped) < MAX_SKIPPED:
            request = self.waiting.popleft()
            chain = self.prefixes.chain(tuple(ref.key for ref in request.segments))
            ready = [s for s in chain if s.complete]
            rest = chain[len(ready) :]
            if rest and rest[0].writer is not None:
                skipped.append(request)  # its prefix is being computed right now
                continue
            attach_upto = rest[0].computed if rest else (ready[-1].end if ready else 0)
            need = self.spec.blocks_for(self._target_tokens(request)) - self.spec.blocks_for(attach_upto)
            if need > free:
                self.waiting.appendleft(request)
                break
            free -= need
            self._start(request, chain, rest, attach_upto)
            n = min(request.num_pending_tokens, budget)
            self._allocate(request, n)
            scheduled[request] = n
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _start(
        self, request: Request, chain: list[SharedSegment], rest: list[SharedSegment], upto: int
    ) -> None:
        """Attach ``request`` to the computed part of its segments and make it the writer of
        the rest; it starts computing at ``upto``."""
        for segment in chain:
            for block in segment.block_ids[: self.spec.blocks_for(min(upto, segment.end) - segment.start)]:
                self.pool.share(block)
                request.block_ids.append(block)
            if segment.end >= upto:
                break
        if rest:
            for segment in rest:
                segment.writer = request
            self.writing[request] = rest
        # Positions before `upto` are in the cache already; never more than the prompt minus
        # its last token (segments end before it), so the request always computes something.
        request.num_computed_tokens = upto
        request.cached_tokens = upto
        self.running.append(request)

    def _target_tokens(self, request: Request) -> int:
        """Tokens the request is expected to reach: prompt plus expected output."""
        return request.prompt_len + self._expected_output(request)

    def _expected_output(self, request: Request) -> int:
        cap = request.params.max_tokens
        if self.reserve_full:
            return cap
        if request.expected_output is not None:
            guess = request.expected_output
        elif self._finished_count >= MIN_OBSERVED:
            guess = math.ceil(GROWTH_MARGIN * self._finished_outputs / self._finished_count)
        else:
            guess = cap
        return min(cap, max(guess, len(request.output_ids) + 1))

    def _future_blocks(self, request: Request) -> int:
        return max(0, self.spec.blocks_for(self._target_tokens(request)) - len(request.block_ids))

    # -- blocks and preemption ---------------------------------------------------------

    def _make_room(self, request: Request, num_tokens: int) -> list[Request]:
        """Preempt the most recently admitted requests until ``request``'s next chunk has its
        blocks; returns them (``request`` itself is last if it had to go too)."""
        victims: list[Request] = []
        while self._new_blocks_needed(request, num_tokens) > self.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            victims.append(victim)
            if victim is request:
                break
        return victims

    def _new_blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Blocks ``_allocate`` would take from the pool (a segment's existing blocks are free)."""
        return sum(
            segment is None or k >= len(segment.block_ids)
            for segment, k in self._opened_blocks(request, num_tokens)
        )

    def _allocate(self, request: Request, num_tokens: int) -> None:
        """Give ``request`` the blocks its next ``num_tokens`` positions land in."""
        for segment, k in self._opened_blocks(request, num_tokens):
            if segment is None:
                request.block_ids.append(self.pool.allocate())
                continue
            if k == len(segment.block_ids):
                segment.block_ids.append(self.pool.allocate())  # the segment's own reference
            self.pool.share(segment.block_ids[k])
            request.block_ids.append(segment.block_ids[k])

    def _opened_blocks(self, request: Request, num_tokens: int) -> Iterator[tuple[SharedSegment | None, int]]:
        """For each block the request's next chunk opens: the segment it writes the block for
        and the block's index in that segment, or ``(None, 0)`` for a block of its own."""
        bs = self.spec.block_size
        writing = self.writing.get(request, ())
        for index in range(
            len(request.block_ids), self.spec.blocks_for(request.num_computed_tokens + num_tokens)
        ):
            position = index * bs
            segment = next((s for s in writing if s.start <= position < s.end), None)
            yield segment, (position - segment.start) // bs if segment else 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._stop_writing(request)
        self.pool.release(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _stop_writing(self, request: Request) -> None:
        for segment in self.writing.pop(request, ()):
            segment.writer = None
