"""What an LRU prefix cache would save on the same batch: the baseline ``batchrun plan`` shows.

General engines (vLLM / SGLang automatic prefix caching) keep the KV blocks of finished
requests in an LRU cache keyed by the block's prefix, and a new request reuses the longest
run of its leading blocks still cached. This simulates that on the job's prefix tree:
requests arrive one by one in file order; every full prompt block is cached (shared ones
as their segment, a request's private blocks as one entry); the cache holds at most
``capacity_blocks`` blocks (the same KV budget batchrun gets) and evicts the least recently
used, a request's tail blocks before its head blocks, as vLLM frees them.

It is deliberately an *upper bound* on what LRU reuses: it ignores that blocks pinned by
running requests shrink the cache, and that requests scheduled in the same step cannot
reuse each other's blocks. The comparison with batchrun is therefore never inflated.

The simulation is a Python loop over rows (~1.4 s per 100k rows), so ``lru_estimate``
simulates at most the first ``LRU_SIMULATED_ROWS`` runnable rows exactly and charges every
later row at the share of its prompt tokens that the second half of the simulated rows
(a warm cache, past the cold start) computed: an estimate, and said to be one, for jobs of
millions of rows, where the exact loop would take a large share of ``plan``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from batchrun.core.planner.prefix_tree import SegmentTree

LRU_SIMULATED_ROWS = 200_000


def lru_estimate(
    tree: SegmentTree,
    lengths: np.ndarray,
    runnable: np.ndarray,
    capacity_blocks: int,
    max_rows: int = LRU_SIMULATED_ROWS,
) -> tuple[int, int]:
    """(prompt tokens an LRU prefix cache would compute, runnable rows simulated exactly):
    exact up to ``max_rows`` runnable rows, extrapolated beyond (see the module notes)."""
    rows = np.flatnonzero(runnable)
    if len(rows) <= max_rows:
        return lru_computed_tokens(tree, lengths, runnable, capacity_blocks), len(rows)
    per_row = _simulate(tree, lengths, rows[:max_rows], capacity_blocks)
    warm = slice(max_rows // 2, max_rows)
    rate = per_row[warm].sum() / max(int(lengths[rows[warm]].sum()), 1)
    rest = int(lengths[rows[max_rows:]].sum())
    return int(per_row.sum()) + round(rate * rest), max_rows


def lru_computed_tokens(
    tree: SegmentTree, lengths: np.ndarray, runnable: np.ndarray, capacity_blocks: int
) -> int:
    """Prompt tokens computed by the runnable rows, in row order, behind an LRU prefix cache."""
    return int(_simulate(tree, lengths, np.flatnonzero(runnable), capacity_blocks).sum())


def _simulate(tree: SegmentTree, lengths: np.ndarray, rows: np.ndarray, capacity_blocks: int) -> np.ndarray:
    """Prompt tokens each of ``rows`` computes, taken in that order behind an LRU cache."""
    bs = tree.block_size
    cache: OrderedDict[tuple[int, int], int] = OrderedDict()  # entry -> blocks cached (a head run)
    held = 0  # blocks in the cache
    paths: dict[int, list[int]] = {}
    computed = np.zeros(len(rows), dtype=np.int64)
    seg_blocks = (tree.lengths // bs).tolist()
    shared_len = tree.shared_length().tolist()
    row_segment = tree.row_segment.tolist()
    for i, row in enumerate(rows.tolist()):
        seg = row_segment[row]
        path = paths.setdefault(seg, tree.path(seg)) if seg >= 0 else []
        hit = 0  # leading tokens served from the cache
        for s in path:
            cached = cache.get((0, s), 0)
            hit += cached * bs
            if cached < seg_blocks[s]:
                break
        length = int(lengths[row])
        computed[i] = length - hit

        # The request now holds all its full blocks; touch them, tail first, so the head
        # ends up most recently used and the tail is evicted first.
        own = length // bs - shared_len[row] // bs
        if own:
            cache[(1, row)] = own
            held += own
        for s in reversed(path):
            held += seg_blocks[s] - cache.pop((0, s), 0)
            cache[(0, s)] = seg_blocks[s]
        while held > capacity_blocks:
            key, blocks = next(iter(cache.items()))
            drop = min(blocks, held - capacity_blocks)
            held -= drop
            if drop == blocks:
                del cache[key]
            else:
                cache[key] = blocks - drop  # the entry keeps its leading blocks
    return computed
