"""From the plan to engine requests: one per sample of each runnable row, in plan order,
each naming the shared segments (KV blocks) it reads."""

from __future__ import annotations

from collections.abc import Iterator

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


def most_kv_tokens(requests: list[Request], block_size: int) -> int:
    """KV positions the job could ever hold at once: every shared segment once, plus each
    request's own part (prompt after its segments + max_tokens), with a block of rounding."""
    segments = {ref.key: ref.end - ref.start for r in requests for ref in r.segments}
    own = sum(r.max_total_tokens - (r.segments[-1].end if r.segments else 0) + block_size for r in requests)
    return own + sum(segments.values())
