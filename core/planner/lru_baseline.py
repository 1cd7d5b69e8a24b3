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
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from batchrun.core.planner.prefix_tree import SegmentTree


def lru_computed_tokens(
    tree: SegmentTree, lengths: np.ndarray, runnable: np.ndarray, capacity_blocks: int
) -> int:
    """Prompt tokens computed by the runnable rows, in row order, behind an LRU prefix cache."""
    bs = tree.block_size
    cache: OrderedDict[tuple[int, int], int] = OrderedDict()  # entry -> blocks cached (a head run)
    held = 0  # blocks in the cache
    paths: dict[int, list[int]] = {}
    computed = 0
    seg_blocks = (tree.lengths // bs).tolist()
    shared_len = tree.shared_length().tolist()
    row_segment = tree.row_segment.tolist()
    for row in np.flatnonzero(runnable).tolist():
        seg = row_segment[row]
        path = paths.setdefault(seg, tree.path(seg)) if seg >= 0 else []
        hit = 0  # leading tokens served from the cache
        for s in path:
            cached = cache.get((0, s), 0)
            hit += cached * bs
            if cached < seg_blocks[s]:
                break
        length = int(lengths[row])
        computed += length - hit

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
