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
  last user finishes (segments.py).
* **Shared prefixes are computed once.** A request whose segment is not yet computed
  becomes its writer; the segment's other users wait until it is complete, then attach to
  its blocks and start at its end. Admission skips past such waiting users (they are
  unblocked within a step or two) rather than leave the step half empty.

The scheduler decides; ``KVManager`` owns the blocks. Its output is a ``StepPlan`` message
(messages.py), never live request objects.
"""

from __future__ import annotations

import math
from collections import deque

from batchrun.core.sched.config import SchedulerConfig
from batchrun.core.sched.kv_manager import KVManager
from batchrun.core.sched.messages import NewRequest, ScheduledChunk, StepPlan
from batchrun.core.sched.request import Request


class Scheduler:
    def __init__(self, kv: KVManager, config: SchedulerConfig = SchedulerConfig()) -> None:
        self.kv = kv
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[int, Request] = {}  # every request taken and not finished, by req_id
        self.num_preemptions = 0
        self._next_id = 0
        self._finished_outputs = 0
        self._finished_count = 0
        # Since the last message: requests the runner must forget.
        self._finished_ids: list[int] = []
        self._preempted_ids: list[int] = []

    # -- requests in and out ---------------------------------------------------------

    def can_ever_fit(self, request: Request) -> bool:
        return self.kv.blocks_for(request.max_total_tokens) <= self.kv.pool.num_blocks

    def add(self, request: Request) -> None:
        """Queue a request (its segments registered with the KV manager); it gets its req_id."""
        if not self.can_ever_fit(request):
            raise ValueError("request can never fit in the KV cache; check can_ever_fit first")
        self._take(request)
        self.kv.register(request)
        self.waiting.append(request)

    def drop(self, request: Request) -> None:
        """A request that will never run (it can never fit): it still counts as a user of its
        segments until now, so they can be freed."""
        self._take(request)
        self.kv.register(request)
        self.kv.dropped(request)
        del self.requests[request.req_id]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Remove a finished request; free its blocks, and its segments after their last user."""
        self.running.remove(request)
        self.kv.finished(request)
        del self.requests[request.req_id]
        self._finished_ids.append(request.req_id)
        self._finished_count += 1
        self._finished_outputs += len(request.output_ids)

    # -- one step ----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        budget = self.config.token_budget
        scheduled: dict[Request, int] = {}  # request -> tokens this step, in schedule order
        new_blocks: dict[Request, list[int]] = {}
        preempted: set[Request] = set()
        decodes = [r for r in self.running if r.num_pending_tokens == 1]
        prefills = [r for r in self.running if r.num_pending_tokens > 1]
        for request in decodes + prefills:
            if budget == 0:
                break
            if request in preempted:
                continue
            n = min(request.num_pending_tokens, budget)
            added = self.kv.allocate_slots(request, n)
            while added is None and request not in preempted:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.add(victim)
                budget += scheduled.pop(victim, 0)
                new_blocks.pop(victim, None)
                if victim is not request:
                    added = self.kv.allocate_slots(request, n)
            if request in preempted:
                continue
            scheduled[request] = n
            new_blocks[request] = added
            budget -= n
        admitted: list[Request] = []
        if not preempted:  # no memory to spare for newcomers in a step that preempted
            budget = self._admit(budget, scheduled, admitted)
        if not scheduled and self.has_work:
            raise RuntimeError(
                f"no request can run: {len(self.waiting)} waiting, {len(self.running)} running, "
                f"{self.kv.num_free}/{self.kv.pool.num_blocks} KV blocks free"
            )
        return self._message(scheduled, new_blocks, admitted)

    def computed(self, step: StepPlan) -> None:
        """Record that the step ran: advance each request and the segments it writes."""
        for chunk in step.chunks:
            request = self.requests[chunk.req_id]
            request.num_computed_tokens += chunk.num_tokens
            self.kv.computed(request)

    def _message(
        self, scheduled: dict[Request, int], new_blocks: dict[Request, list[int]], admitted: list[Request]
    ) -> StepPlan:
        fresh = set(admitted)
        chunks = tuple(
            ScheduledChunk(r.req_id, n, samples=n == r.num_pending_tokens) for r, n in scheduled.items()
        )
        new_requests = tuple(
            NewRequest(
                r.req_id,
                r.all_token_ids(),
                r.prompt_len,
                r.num_computed_tokens,
                tuple(r.block_ids),
                r.params,
                r.seed,
                r.prefix_group,
            )
            for r in admitted
        )
        grown = {r.req_id: tuple(b) for r, b in new_blocks.items() if b and r not in fresh}
        plan = StepPlan(chunks, new_requests, grown, tuple(self._finished_ids), tuple(self._preempted_ids))
        self._finished_ids, self._preempted_ids = [], []
        return plan

    # -- admission ---------------------------------------------------------------------

    def _admit(self, budget: int, scheduled: dict[Request, int], admitted: list[Request]) -> int:
        free = self.kv.num_free - sum(self._future_blocks(r) for r in self.running)
        skipped: list[Request] = []
        while budget > 0 and self.waiting and len(skipped) < self.config.max_skipped:
            request = self.waiting.popleft()
            upto = self.kv.attach_point(request)
            if upto is None:
                skipped.append(request)  # its prefix is being computed right now
                continue
            need = self.kv.blocks_for(self._target_tokens(request)) - self.kv.blocks_for(upto)
            if need > free:
                self.waiting.appendleft(request)
                break
            free -= need
            self.kv.start(request, upto)
            # Positions before `upto` are in the cache already; never more than the prompt
            # minus its last token (segments end before it), so the request computes something.
            request.num_computed_tokens = upto
            request.cached_tokens = upto
            self.running.append(request)
            n = min(request.num_pending_tokens, budget)
            added = self.kv.allocate_slots(request, n)
            assert added is not None, "admission counted the blocks this chunk needs"
            scheduled[request] = n
            admitted.append(request)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _target_tokens(self, request: Request) -> int:
        """Tokens the request is expected to reach: prompt plus expected output."""
        return request.prompt_len + self._expected_output(request)

    def _expected_output(self, request: Request) -> int:
        cap = request.params.max_tokens
        if self.config.reserve_full:
            return cap
        if request.expected_output is not None:
            guess = request.expected_output
        elif self._finished_count >= self.config.min_observed:
            guess = math.ceil(self.config.growth_margin * self._finished_outputs / self._finished_count)
        else:
            guess = cap
        return min(cap, max(guess, len(request.output_ids) + 1))

    def _future_blocks(self, request: Request) -> int:
        return max(0, self.kv.blocks_for(self._target_tokens(request)) - len(request.block_ids))

    # -- preemption --------------------------------------------------------------------

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted_ids.append(request.req_id)
        self.waiting.appendleft(request)

    def _take(self, request: Request) -> None:
        request.req_id = self._next_id
        self._next_id += 1
        self.requests[request.req_id] = request
