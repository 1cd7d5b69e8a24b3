"""From the plan to engine requests: one per sample of each runnable row, in plan order,
each naming the shared segments (KV blocks) it reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from batchrun.core.job.prepare import effective_seed
from batchrun.core.job.rows import Row
from batchrun.core.params import row_seed
from batchrun.core.planner.plan import Plan
from batchrun.core.planner.prompt_tokens import PromptTokens
from batchrun.core.sched.request import Request, SegmentRef


def make_requests(
    rows: list[Row], prompts: PromptTokens, plan: Plan, job_seed: int, sample_sharing: bool = True
) -> Iterator[Request]:
    """The requests of the runnable rows in plan order: one per sample, each reading its
    plan segments; the ``n`` samples of a row also share its prompt as one more segment."""
    tree, block_size = plan.tree, plan.block_size
    paths: dict[int, tuple[SegmentRef, ...]] = {-1: ()}
    row_group = plan.row_group()
    for index in plan.order.tolist():
        row = rows[index]
        params = row.params
        deepest = int(tree.row_segment[index])
        if deepest not in paths:
            paths[deepest] = tuple(
                SegmentRef(s, int(tree.start[s]), int(tree.end[s])) for s in tree.path(deepest)
            )
        segments = paths[deepest]
        prompt = prompts[index]
        shared_end = segments[-1].end if segments else 0
        own_end = (len(prompt) - 1) // block_size * block_size  # full blocks before the last token
        group = int(row_group[index])
        prefix_group = (group, int(tree.end[group])) if group >= 0 else None
        if params.n > 1 and sample_sharing and own_end > shared_end:
            segments += (SegmentRef(len(tree) + index, shared_end, own_end),)
            prefix_group = (len(tree) + index, own_end)  # the samples share the whole prompt
        seed = effective_seed(row, job_seed)
        for k in range(params.n):
            sample_seed = seed if k == 0 else row_seed(seed, f"sample {k}")
            yield Request(
                row.index,
                prompt,
                params,
                None if params.greedy else sample_seed,
                sample_index=k,
                segments=segments,
                expected_output=row.expected_tokens,
                prefix_group=prefix_group,
            )


class RowSamples:
    """Per-row numbers the engine's sizing and segment counts need, as arrays over the plan's
    order (no ``Request`` objects): prompt length, ``max_tokens`` and samples ``n``."""

    def __init__(self, rows: list[Row], prompts: PromptTokens, plan: Plan) -> None:
        order = plan.order
        self.order = order
        self.lengths = prompts.lengths[order]
        self.max_tokens = np.fromiter(
            (rows[i].params.max_tokens for i in order.tolist()), np.int64, len(order)
        )
        self.n = np.fromiter((rows[i].params.n for i in order.tolist()), np.int64, len(order))


def segment_ends(
    plan: Plan, samples: RowSamples, sample_sharing: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per planned row (plan order): where its plan segments end, and where its shared prompt
    ends (past its plan segments when its ``n`` samples share their prompt as one more
    segment, as ``make_requests`` makes them)."""
    tree, bs = plan.tree, plan.block_size
    shared_end = tree.shared_length(samples.order)
    own_end = (samples.lengths - 1) // bs * bs
    own_segment = (samples.n > 1) & sample_sharing & (own_end > shared_end)
    return shared_end, np.where(own_segment, own_end, shared_end)


def segment_users(plan: Plan, samples: RowSamples) -> Callable[[int], int]:
    """``key -> number of requests reading segment key`` for ``make_requests``' requests: a
    plan segment is read by every sample of every planned row below it; a row's own sample
    segment (key ``len(tree) + row``) by its ``n`` samples. Arrays only, for the engine's
    lazy admission (``Engine.generate(..., segment_users=...)``)."""
    tree = plan.tree
    users = np.zeros(len(tree), dtype=np.int64)
    deepest = tree.row_segment[samples.order]
    np.add.at(users, deepest[deepest >= 0], samples.n[deepest >= 0])
    for d in range(int(tree.depth.max(initial=1)), 1, -1):  # children into parents, deepest first
        child = np.flatnonzero(tree.depth == d)
        np.add.at(users, tree.parent[child], users[child])
    n_of_row = np.zeros(len(tree.row_segment), dtype=np.int64)
    n_of_row[samples.order] = samples.n
    num_segments = len(tree)

    def users_of(key: int) -> int:
        return int(users[key]) if key < num_segments else int(n_of_row[key - num_segments])

    return users_of


def most_kv_tokens(plan: Plan, samples: RowSamples, sample_sharing: bool = True) -> int:
    """KV positions the job could ever hold at once: every shared segment once, plus each
    request's own part (prompt after its segments + max_tokens), with a block of rounding."""
    if not len(samples.order):
        return 0
    tree, bs = plan.tree, plan.block_size
    plan_end, shared_end = segment_ends(plan, samples, sample_sharing)
    used = np.zeros(len(tree), dtype=bool)
    deepest = tree.row_segment[samples.order]
    used[deepest[deepest >= 0]] = True
    for d in range(int(tree.depth.max(initial=1)), 1, -1):  # a used segment's parents are used
        child = np.flatnonzero((tree.depth == d) & used)
        used[tree.parent[child]] = True
    segments = int(tree.lengths[used].sum()) + int((shared_end - plan_end).sum())
    own = samples.n * (samples.lengths + samples.max_tokens - shared_end + bs)
    return int(own.sum()) + segments
