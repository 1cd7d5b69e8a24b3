"""Allocator and scheduler, with exact block ids (no model involved)."""

from __future__ import annotations

import pickle

import pytest

from batchrun.core.params import SamplingParams
from batchrun.core.sched.block_pool import BlockPool, OutOfBlocks
from batchrun.core.sched.config import SchedulerConfig
from batchrun.core.sched.kv_manager import KVManager
from batchrun.core.sched.request import Request, SegmentRef
from batchrun.core.sched.scheduler import Scheduler

BLOCK_SIZE = 4


def scheduler(pool: BlockPool, token_budget: int, reserve_full: bool = False) -> Scheduler:
    return Scheduler(KVManager(pool, BLOCK_SIZE), SchedulerConfig(token_budget, reserve_full))


def test_pool_reuses_the_most_recently_freed_ids_before_unused_ones():
    pool = BlockPool(5)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    pool.release([1])
    pool.release([0])
    # freed ids come back most recent first (warm, already-touched memory), then fresh ones
    assert [pool.allocate() for _ in range(4)] == [0, 1, 3, 4]
    with pytest.raises(OutOfBlocks):
        pool.allocate()


def test_shared_block_is_freed_by_its_last_holder():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.share(block)
    pool.release([block])
    assert pool.refcount(block) == 1 and pool.num_free == 1
    pool.release([block])
    assert pool.num_free == 2
    with pytest.raises(ValueError):
        pool.release([block])


def request(i, prompt_len, max_tokens):
    return Request(i, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens))


def complete(sched, step):
    """What the engine does after a step: advance the requests, give each sampler a token."""
    sched.computed(step)
    for chunk in step.chunks:
        if chunk.samples:
            sched.requests[chunk.req_id].output_ids.append(0)


def rows(sched, step, *fields):
    """Each chunk as (row, num_tokens[, samples])."""
    return [(sched.requests[c.req_id].row, *(getattr(c, f) for f in fields)) for c in step.chunks]


def test_prefill_is_chunked_to_the_token_budget_and_decodes_go_first():
    pool = BlockPool(11)
    sched = scheduler(pool, token_budget=6)
    a, b = request(0, 9, 2), request(1, 3, 2)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()  # a: 6 of 9 prompt tokens; budget spent, b waits
    assert rows(sched, step, "num_tokens", "samples") == [(0, 6, False)]
    assert a.block_ids == [0, 1]
    complete(sched, step)
    step = sched.schedule()  # a finishes its prompt (3), b is admitted with the rest (3)
    assert rows(sched, step, "num_tokens", "samples") == [
        (0, 3, True),
        (1, 3, True),
    ]
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3]
    complete(sched, step)
    step = sched.schedule()  # both decode: one token each
    assert rows(sched, step, "num_tokens") == [(0, 1), (1, 1)]
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3]  # positions 9 and 3 fit open blocks
    complete(sched, step)
    sched.schedule()
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3, 4]  # b's position 4 opens block 4


def test_full_reservation_limits_admission_by_memory_not_by_count():
    pool = BlockPool(5)
    sched = scheduler(pool, token_budget=100, reserve_full=True)
    reqs = [request(i, 4, 4) for i in range(3)]  # each may need 2 blocks
    for r in reqs:
        sched.add(r)
    sched.schedule()
    assert sched.running == reqs[:2]
    assert pool.num_used == 2  # only prompt blocks are allocated yet
    sched.finish(reqs[0])
    assert pool.num_used == 1
    sched.schedule()
    assert reqs[2] in sched.running


def shared(i, prompt, segments, max_tokens=4):
    return Request(i, prompt, SamplingParams(max_tokens=max_tokens), segments=segments)


def sharing_scheduler(num_blocks, requests, budget=100):
    pool = BlockPool(num_blocks)
    sched = scheduler(pool, token_budget=budget)
    for r in requests:
        sched.add(r)
    return pool, sched.kv.prefixes, sched


def test_a_shared_segment_is_computed_once_and_freed_by_its_last_user():
    system = SegmentRef(key=0, start=0, end=8)  # two blocks shared by three requests
    reqs = [shared(i, [7] * 8 + [i, i], (system,)) for i in range(3)]
    pool, prefixes, sched = sharing_scheduler(8, reqs)
    step = sched.schedule()
    # The first user writes the segment (blocks 0, 1) and its own tail (block 2); the others
    # wait for the segment instead of computing it again.
    assert rows(sched, step, "num_tokens") == [(0, 10)]
    assert reqs[0].block_ids == [0, 1, 2] and prefixes.segments[0].block_ids == [0, 1]
    assert [pool.refcount(b) for b in (0, 1, 2)] == [2, 2, 1]  # segment + writer; writer alone
    complete(sched, step)
    assert prefixes.segments[0].complete
    step = sched.schedule()  # the writer decodes; the others attach and compute only their tail
    assert rows(sched, step, "num_tokens") == [(0, 1), (1, 2), (2, 2)]
    assert reqs[1].block_ids == [0, 1, 3] and reqs[2].block_ids == [0, 1, 4]
    assert reqs[1].cached_tokens == reqs[2].cached_tokens == 8 and reqs[0].cached_tokens == 0
    assert [pool.refcount(b) for b in (0, 1)] == [4, 4]
    complete(sched, step)
    for r in reqs[:2]:
        sched.finish(r)
    assert [pool.refcount(b) for b in (0, 1)] == [2, 2] and pool.num_used == 3
    sched.finish(reqs[2])  # the last user: the segment's blocks go back
    assert pool.num_used == 0 and not prefixes.segments


def test_nested_segments_and_a_writer_handing_over_after_preemption():
    system = SegmentRef(0, 0, 4)
    doc_a, doc_b = SegmentRef(1, 4, 8), SegmentRef(2, 4, 8)
    a1 = shared(0, [1] * 4 + [2] * 4 + [5, 6], (system, doc_a))
    a2 = shared(1, [1] * 4 + [2] * 4 + [5, 7], (system, doc_a))
    b1 = shared(2, [1] * 4 + [3] * 4 + [5, 6], (system, doc_b))
    b2 = shared(3, [1] * 4 + [3] * 4 + [5, 7], (system, doc_b))
    pool, prefixes, sched = sharing_scheduler(16, [a1, a2, b1, b2], budget=6)
    step = sched.schedule()  # a1 writes system and half of doc_a; a2 waits for doc_a
    assert rows(sched, step, "num_tokens") == [(0, 6)] and a1.block_ids == [0, 1]
    complete(sched, step)
    assert prefixes.segments[0].complete and not prefixes.segments[1].complete
    # b1 may start now: system is complete; it writes doc_b while a1 finishes doc_a.
    step = sched.schedule()
    assert rows(sched, step, "num_tokens") == [(0, 4), (2, 2)]
    assert a1.block_ids == [0, 1, 2] and b1.block_ids == [0, 3]
    complete(sched, step)
    assert prefixes.segments[2].computed == 6  # doc_b half written
    sched._preempt(b1)  # memory ran dry: b1 goes, doc_b's written half stays with the segment
    assert prefixes.segments[2].writer is None and prefixes.segments[2].block_ids == [3]
    assert pool.refcount(3) == 1 and pool.refcount(0) == 2  # segment only; segment + a1
    assert list(sched.waiting) == [b1, a2, b2]
    step = sched.schedule()
    # a1 decodes; b1 comes back first, re-attaches to doc_b's block 3 and writes only the rest;
    # a2 attaches to the now complete doc_a and starts its tail.
    assert rows(sched, step, "num_tokens") == [(0, 1), (2, 4), (1, 1)]
    assert b1.block_ids == [0, 3, 4] and b1.cached_tokens == 6
    assert a2.block_ids == [0, 1, 5] and a2.cached_tokens == 8


def test_preemption_frees_the_newest_request_and_keeps_outputs():
    pool = BlockPool(4)
    sched = scheduler(pool, token_budget=100)
    sched._finished_count, sched._finished_outputs = 100, 100  # outputs so far: 1 token each
    a, b = request(0, 4, 8), request(1, 4, 8)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()  # both admitted: each is expected to need 2 blocks
    assert rows(sched, step, "num_tokens") == [(0, 4), (1, 4)] and a.block_ids == [0] and b.block_ids == [1]
    complete(sched, step)
    for _ in range(4):  # decodes fill blocks 2 and 3 ...
        step = sched.schedule()
        complete(sched, step)
    assert a.block_ids == [0, 2] and b.block_ids == [1, 3]
    for _ in range(4):
        step = sched.schedule()
        complete(sched, step)
    # ... until a needs a third block: b, the newest, is preempted (blocks 1 and 3 freed,
    # its 5 sampled tokens kept for the recomputation) and a takes block 3, the last freed.
    assert sched.num_preemptions == 1 and b.num_preemptions == 1
    assert len(b.output_ids) == 5 and b.num_computed_tokens == 0 and list(sched.waiting) == [b]
    assert a.block_ids == [0, 2, 3] and pool.num_used == 3
    sched.finish(a)
    step = sched.schedule()  # b recomputes its prompt and the tokens it had sampled
    # freed ids are reused most recent first: a's blocks, released in order, come back reversed
    assert rows(sched, step, "num_tokens") == [(1, 9)] and b.block_ids == [3, 2, 0]


def test_a_request_that_can_never_fit_is_refused():
    sched = scheduler(BlockPool(2), token_budget=100)
    big = request(0, 8, 1)
    assert not sched.can_ever_fit(big)
    with pytest.raises(ValueError):
        sched.add(big)


def test_the_step_message_sends_a_request_once_then_only_what_changed():
    """The runner sees messages, never requests: a request in full when admitted (and again
    after a preemption), then per step its token count and new blocks; finished and
    preempted ids before the step that follows. The message pickles (another process)."""
    pool = BlockPool(4)
    sched = scheduler(pool, token_budget=100)
    sched._finished_count, sched._finished_outputs = 100, 100  # expect 1-token outputs: admit both
    a, b = request(0, 4, 8), request(1, 4, 8)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert [n.req_id for n in step.new_requests] == [a.req_id, b.req_id]
    assert step.new_requests[0].block_ids == (0,) and step.new_requests[0].token_ids.tolist() == [0, 1, 2, 3]
    assert step.new_block_ids == {} and step.finished_req_ids == step.preempted_req_ids == ()
    complete(sched, step)
    step = sched.schedule()  # both decode at position 4: each opens a block
    assert step.new_requests == () and step.new_block_ids == {a.req_id: (2,), b.req_id: (3,)}
    assert pickle.loads(pickle.dumps(step)) == step
    complete(sched, step)
    for _ in range(7):  # a needs a third block at position 8: b is preempted
        step = sched.schedule()
        complete(sched, step)
        if step.preempted_req_ids:
            break
    assert step.preempted_req_ids == (b.req_id,) and b.req_id not in step.new_block_ids
    sched.finish(a)
    step = sched.schedule()  # b comes back in full, its sampled tokens included
    assert step.finished_req_ids == (a.req_id,)
    (back,) = step.new_requests
    assert back.req_id == b.req_id and len(back.token_ids) == 4 + len(b.output_ids)
    assert back.block_ids == tuple(b.block_ids) and back.num_computed_tokens == 0


def test_allocate_slots_gives_nothing_when_the_pool_is_short():
    kv = KVManager(BlockPool(2), BLOCK_SIZE)
    r = request(0, 12, 1)
    kv.register(r)
    kv.start(r, 0)
    assert kv.allocate_slots(r, 12) is None and r.block_ids == [] and kv.num_free == 2
    assert kv.allocate_slots(r, 8) == [0, 1] and kv.num_free == 0
