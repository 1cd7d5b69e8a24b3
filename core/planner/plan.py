"""The execution plan: shared segments, first-level groups, a row order and what it saves.

``build_plan`` turns the prefix tree (prefix_tree.py) into what the engine and the user
need:

* **order** — depth-first over the segment tree, so the users of a segment run together
  and its KV blocks die early. Among the children of a node (sub-segments and rows whose
  deepest segment it is) the larger decode-to-prompt ratio goes first (BatchLLM): long
  decodes start early and later prefill chunks overlap with them. The ratio of a subtree
  is its expected decode tokens over the prompt tokens it still has to compute. Ties
  break on the lowest row index, so the plan is deterministic.
* **first-level groups** — BatchLLM's flattening of the nested tree into one shared prefix
  per group, as a cascade attention kernel reads it. Walking down, a segment ``g`` leaves
  the group it would inherit (prefix length ``L``) and starts its own group when
  ``gain = (users(g) - 1) * (end(g) - L) - L > 0``: its users stop re-reading its tokens
  (``end(g) - L`` each, for all but one user) at the price of one more read of the
  inherited prefix. Top-level segments always start a group.
* **summary** — the numbers ``batchrun plan`` prints and ``report.json`` keeps.

The plan is plain data; ``plan_io.py`` saves and loads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np

from batchrun.core.planner.prefix_tree import SegmentTree, build_segment_tree
from batchrun.core.planner.prompt_tokens import PromptTokens

ORDER_PLAN = "plan"
ORDER_INPUT = "input"


@dataclass(frozen=True)
class PlanSummary:
    rows: int  # rows in the input, runnable or not
    runnable_rows: int  # rows the plan schedules (the others are error rows)
    prompt_tokens: int  # over runnable rows
    computed_tokens: int  # prompt tokens the engine computes with the plan's sharing
    shared_segments: int
    shared_segment_tokens: int  # tokens over all segments, each counted once
    groups: int  # first-level groups that have rows
    expected_output_tokens: int  # sum over runnable rows of expected_tokens or max_tokens
    block_size: int

    @property
    def saving(self) -> float:
        """Share of prompt tokens the plan does not compute: 1 - computed / total."""
        return 1.0 - self.computed_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self) | {"saving": self.saving}


@dataclass(frozen=True, eq=False)
class Plan:
    tree: SegmentTree
    order: np.ndarray  # int64 [runnable_rows]: row indices in execution order
    group_of_segment: np.ndarray  # int64 [num_segments]: the segment heading its first-level group
    summary: PlanSummary
    tokens_digest: str  # PromptTokens.digest() of the tokens it was made for
    order_kind: str = ORDER_PLAN

    @property
    def block_size(self) -> int:
        return self.tree.block_size

    def without(self, rows: set[int]) -> Plan:
        """The same plan with ``rows`` taken out of the order (they are already done)."""
        if not rows:
            return self
        keep = ~np.isin(self.order, np.fromiter(rows, dtype=np.int64))
        return dataclasses.replace(self, order=self.order[keep])

    def row_group(self) -> np.ndarray:
        """Each row's first-level group (a segment id), -1 for rows that share nothing."""
        group = np.append(self.group_of_segment, -1)
        return group[self.tree.row_segment]


def build_plan(
    prompts: PromptTokens,
    runnable: np.ndarray,
    expected_tokens: np.ndarray,
    block_size: int,
    *,
    sharing: bool = True,
    order: str = ORDER_PLAN,
) -> Plan:
    """Plan the ``runnable`` rows (bool mask) of ``prompts``.

    ``expected_tokens`` [num_rows] estimates each row's output length (its hint, else its
    ``max_tokens``). ``sharing=False`` plans no shared segment; ``order="input"`` keeps
    file order. Both exist to measure what each idea is worth.
    """
    runnable = np.asarray(runnable, dtype=bool)
    if sharing:
        tree = build_segment_tree(prompts, runnable, block_size)
    else:
        tree = build_segment_tree(prompts, np.zeros_like(runnable), block_size)
    lengths = np.where(runnable, prompts.lengths, 0)
    decode = np.where(runnable, np.asarray(expected_tokens, dtype=np.int64), 0)
    if order == ORDER_PLAN:
        row_order = depth_first_order(tree, runnable, lengths, decode)
    elif order == ORDER_INPUT:
        row_order = np.flatnonzero(runnable)
    else:
        raise ValueError(f"unknown order {order!r}; use {ORDER_PLAN!r} or {ORDER_INPUT!r}")
    groups = first_level_groups(tree)
    computed = int(lengths.sum() - tree.shared_length().sum() + tree.lengths.sum())
    summary = PlanSummary(
        rows=len(prompts),
        runnable_rows=int(runnable.sum()),
        prompt_tokens=int(lengths.sum()),
        computed_tokens=computed,
        shared_segments=len(tree),
        shared_segment_tokens=int(tree.lengths.sum()),
        groups=len(np.unique(groups[tree.row_segment[tree.row_segment >= 0]])),
        expected_output_tokens=int(decode.sum()),
        block_size=block_size,
    )
    return Plan(tree, row_order, groups, summary, prompts.digest(), order)


def subtree_totals(tree: SegmentTree, own_prompt: np.ndarray, decode: np.ndarray):
    """Per segment: (prompt tokens still to compute, expected decode tokens) of its subtree.

    ``own_prompt`` and ``decode`` are per row; rows outside every segment are ignored.
    """
    prompt = tree.lengths.astype(np.float64)
    dec = np.zeros(len(tree), dtype=np.float64)
    in_tree = tree.row_segment >= 0
    np.add.at(prompt, tree.row_segment[in_tree], own_prompt[in_tree])
    np.add.at(dec, tree.row_segment[in_tree], decode[in_tree])
    for d in range(int(tree.depth.max(initial=1)), 1, -1):  # children into parents, deepest first
        child = np.flatnonzero(tree.depth == d)
        np.add.at(prompt, tree.parent[child], prompt[child])
        np.add.at(dec, tree.parent[child], dec[child])
    return prompt, dec


def depth_first_order(
    tree: SegmentTree, runnable: np.ndarray, lengths: np.ndarray, decode: np.ndarray
) -> np.ndarray:
    """Runnable rows, depth-first over segments, larger decode/prompt ratio first."""
    rows = np.flatnonzero(runnable)
    own_prompt = lengths - tree.shared_length()  # >= 1 for a runnable row: its last token
    seg_prompt, seg_decode = subtree_totals(tree, own_prompt, decode)

    # Items are segments (ids 0..S-1) then rows; each has a parent segment (-1 = root).
    num_segments = len(tree)
    parent = np.concatenate([tree.parent, tree.row_segment[rows]])
    ratio = np.concatenate([seg_decode / seg_prompt, decode[rows] / np.maximum(own_prompt[rows], 1)])
    tiebreak = np.concatenate([tree.first_row, rows])
    is_row = np.concatenate([np.zeros(num_segments, bool), np.ones(len(rows), bool)])
    ref = np.concatenate([np.arange(num_segments), rows])
    items = np.lexsort((is_row, tiebreak, -ratio, parent))  # children of a parent are contiguous
    bounds = np.searchsorted(parent[items], np.arange(-1, num_segments + 1))  # parent p at [p + 1]

    def children_of(segment: int) -> list:
        """[children, positions of the sub-segments among them, next sub-segment, next child]"""
        children = items[bounds[segment + 1] : bounds[segment + 2]]
        return [children, np.flatnonzero(~is_row[children]), 0, 0]

    out: list[np.ndarray] = []
    stack = [children_of(-1)]
    while stack:
        frame = stack[-1]
        children, seg_positions, i, pos = frame
        if i == len(seg_positions):
            out.append(ref[children[pos:]])  # the rows after the last sub-segment
            stack.pop()
            continue
        k = int(seg_positions[i])
        out.append(ref[children[pos:k]])  # the rows before this sub-segment
        frame[2], frame[3] = i + 1, k + 1
        stack.append(children_of(int(ref[children[k]])))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def first_level_groups(tree: SegmentTree) -> np.ndarray:
    """The segment heading each segment's first-level group (itself if it starts one)."""
    group = np.arange(len(tree))
    for d in range(2, int(tree.depth.max(initial=1)) + 1):  # parents are decided first
        seg = np.flatnonzero(tree.depth == d)
        inherited = group[tree.parent[seg]]
        prefix = tree.end[inherited]
        gain = (tree.users[seg] - 1) * (tree.end[seg] - prefix) - prefix
        group[seg] = np.where(gain > 0, seg, inherited)
    return group
