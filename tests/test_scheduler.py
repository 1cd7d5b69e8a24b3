"""Allocator and scheduler, with exact block ids (no model involved)."""

from __future__ import annotations

import pytest
import torch

from batchrun.core.kv_cache import BlockPool, KVCacheSpec, OutOfBlocks
from batchrun.core.params import SamplingParams
from batchrun.core.request import Request
from batchrun.core.scheduler import Scheduler

SPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32, block_size=4)


def test_pool_hands_out_lowest_ids_and_reuses_freed_ones_last():
    pool = BlockPool(4)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    pool.release([1])
    assert pool.allocate() == 3 and pool.allocate() == 1
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


def complete(chunks):
    for chunk in chunks:
        chunk.request.num_computed_tokens += chunk.num_tokens
        if chunk.samples:
            chunk.request.output_ids.append(0)


def test_prefill_is_chunked_to_the_token_budget_and_decodes_go_first():
    pool = BlockPool(11)
    sched = Scheduler(pool, SPEC, token_budget=6)
    a, b = request(0, 9, 2), request(1, 3, 2)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()  # a: 6 of 9 prompt tokens; budget spent, b waits
    assert [(c.request.request_id, c.num_tokens, c.samples) for c in step.chunks] == [(0, 6, False)]
    assert a.block_ids == [0, 1]
    complete(step.chunks)
    step = sched.schedule()  # a finishes its prompt (3), b is admitted with the rest (3)
    assert [(c.request.request_id, c.num_tokens, c.samples) for c in step.chunks] == [
        (0, 3, True),
        (1, 3, True),
    ]
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3]
    complete(step.chunks)
    step = sched.schedule()  # both decode: one token each
    assert [(c.request.request_id, c.num_tokens) for c in step.chunks] == [(0, 1), (1, 1)]
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3]  # positions 9 and 3 fit open blocks
    complete(step.chunks)
    sched.schedule()
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3, 4]  # b's position 4 opens block 4


def test_admission_is_limited_by_reserved_memory_not_by_count():
    pool = BlockPool(5)
    sched = Scheduler(pool, SPEC, token_budget=100)
    reqs = [request(i, 4, 4) for i in range(3)]  # each may need 2 blocks
    for r in reqs:
        sched.add(r)
    sched.schedule()
    assert sched.running == reqs[:2] and sched.num_reserved == 4
    assert pool.num_used == 2  # only prompt blocks are allocated yet
    sched.finish(reqs[0])
    assert pool.num_used == 1 and sched.num_reserved == 2
    sched.schedule()
    assert reqs[2] in sched.running


def test_a_request_that_can_never_fit_is_refused():
    sched = Scheduler(BlockPool(2), SPEC, token_budget=100)
    big = request(0, 8, 1)
    assert not sched.can_ever_fit(big)
    with pytest.raises(ValueError):
        sched.add(big)
