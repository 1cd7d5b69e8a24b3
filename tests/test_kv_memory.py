"""The KV pool's memory on CPU: a pool sized for a whole job costs resident memory only for
the blocks used (one anonymous mapping, pages provided as first written), and freed blocks
are reused before never-touched ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from batchrun.core.runner.kv_cache import KVCache, KVCacheSpec
from batchrun.core.sched.block_pool import BlockPool

STATM = Path("/proc/self/statm")


def resident_bytes() -> int:
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not STATM.exists(), reason="reads resident memory from /proc (Linux)")
def test_a_large_pool_costs_memory_only_where_written():
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)
    blocks = (1 << 30) // spec.bytes_per_block  # a 1 GiB pool
    before = resident_bytes()
    cache = KVCache(spec, blocks, torch.device("cpu"))
    assert resident_bytes() - before < 64 << 20  # nothing is touched by creating it
    keys, values = cache.layer(3)
    assert keys.shape == (blocks + 1, 16, 2, 64) and keys[cache.null_block].abs().sum() == 0
    assert float(values[blocks // 2].abs().sum()) == 0.0  # every element starts at zero
    keys[:100] = 1.0  # 100 blocks of one layer: 400 KiB
    assert resident_bytes() - before < 64 << 20
    assert float(cache.keys[2][:100].abs().sum()) == 0.0  # the layers do not overlap


def test_freed_blocks_are_reused_before_fresh_ones():
    pool = BlockPool(1000)
    for _ in range(50):  # requests come and go, never more than 3 blocks at once
        held = [pool.allocate() for _ in range(3)]
        pool.release(held)
    assert pool.peak_used == 3
    assert max(pool.allocate() for _ in range(3)) == 2  # the same three blocks, all along
