"""Work units for scale-out: the plan's rows cut at prefix-group boundaries into units that
one worker's engine runs whole. NumPy only, no Ray: ``batchrun plan --workers N`` uses it too.

A unit is a set of rows one engine runs in one ``generate`` call, so every shared segment its
rows read is computed once *in that unit*. Invariants (tests/test_split.py checks them):

* every planned row is in exactly one unit; a unit's rows keep the plan's order;
* a top-level prefix subtree (every row below one top-level shared segment) costing at most a
  fair share (total cost / workers) is never split: its rows are all in one unit;
* a subtree costing more is split at its children, recursively: each sub-segment's subtree is
  placed by the same rule and the rows directly under the segment are cut, in plan order, into
  chunks of about a fair share. Every piece recomputes the prefix above it once — the only
  tokens scale-out computes that one process would not;
* small pieces (rows that share nothing, small subtrees) are merged, in plan order, into units
  of up to ``merge`` (half) of a fair share, so workers pull a few units each instead of
  thousands of tiny ones, a fast worker can still take more, and a prefix above split pieces
  is recomputed by few units.

Cost is in tokens the engine computes: a unit's prompt tokens after sharing (each segment once)
plus its rows' expected output tokens (``expected_tokens`` or ``max_tokens``, times ``n``).
Units are queued longest first (longest-processing-time first); idle workers pull the next.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from batchrun.core.planner.plan import Plan

MERGE_FRACTION = 0.5  # small pieces merge into units of up to this share of a fair share


@dataclass(frozen=True, eq=False)
class WorkUnit:
    rows: np.ndarray  # int64 row indices, in plan order
    prompt_tokens: int  # prompt tokens the unit computes: its segments once, plus each row's own
    output_tokens: int  # expected output tokens of its rows

    @property
    def cost(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True, eq=False)
class Split:
    units: list[WorkUnit]  # longest first: the order workers pull them in
    workers: int
    fair_share: float  # total cost / workers
    split_segments: np.ndarray  # int64: segments whose rows went to more than one piece

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens computed over all units (>= the single-process plan's)."""
        return sum(u.prompt_tokens for u in self.units)

    @property
    def cost(self) -> int:
        return sum(u.cost for u in self.units)

    def balance(self) -> list[int]:
        """Each worker's cost if equal workers pull units in queue order (LPT); the job takes
        about as long as the largest."""
        return lpt_loads([u.cost for u in self.units], self.workers)

    def unit_of_row(self, num_rows: int) -> np.ndarray:
        """int64 [num_rows]: each row's unit (its index in ``units``), -1 for unplanned rows."""
        unit = np.full(num_rows, -1, dtype=np.int64)
        for i, u in enumerate(self.units):
            unit[u.rows] = i
        return unit


def lpt_loads(costs: list[int], workers: int) -> list[int]:
    """Loads after giving each cost, in order, to the least-loaded of ``workers``."""
    heap = [(0, w) for w in range(workers)]
    loads = [0] * workers
    for cost in costs:
        load, w = heapq.heappop(heap)
        loads[w] = load + cost
        heapq.heappush(heap, (loads[w], w))
    return loads


def split_plan(
    plan: Plan, lengths: np.ndarray, decode: np.ndarray, workers: int, merge: float = MERGE_FRACTION
) -> Split:
    """Cut ``plan``'s rows into work units for ``workers`` (see the module docstring).

    ``lengths`` [num_rows] are the prompt lengths, ``decode`` [num_rows] the expected output
    tokens of each row (all samples)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tree, order = plan.tree, plan.order
    num_rows, num_segments = len(lengths), len(tree)
    planned = np.zeros(num_rows, dtype=bool)
    planned[order] = True
    own = np.where(planned, lengths - tree.shared_length(), 0).astype(np.int64)
    out = np.where(planned, decode, 0).astype(np.int64)
    row_cost = own + out
    position = np.empty(num_rows, dtype=np.int64)
    position[order] = np.arange(len(order))

    # Per segment: its subtree's cost (own segment tokens + descendants' + rows') and rows.
    seg_rows = np.zeros(num_segments, dtype=np.int64)
    cost = tree.lengths.astype(np.int64).copy()
    in_tree = planned & (tree.row_segment >= 0)
    np.add.at(cost, tree.row_segment[in_tree], row_cost[in_tree])
    np.add.at(seg_rows, tree.row_segment[in_tree], 1)
    for d in range(int(tree.depth.max(initial=1)), 1, -1):  # children into parents, deepest first
        child = np.flatnonzero((tree.depth == d) & (seg_rows > 0))
        np.add.at(cost, tree.parent[child], cost[child])
        np.add.at(seg_rows, tree.parent[child], seg_rows[child])
    total = int(cost[(tree.parent == -1) & (seg_rows > 0)].sum() + row_cost[planned & ~in_tree].sum())
    fair = max(total / workers, 1.0)

    # Direct rows of each segment, in plan order; sub-segments of each segment.
    ordered_in_tree = order[tree.row_segment[order] >= 0]
    by_seg = ordered_in_tree[np.argsort(tree.row_segment[ordered_in_tree], kind="stable")]
    row_bounds = np.searchsorted(tree.row_segment[by_seg], np.arange(num_segments + 1))
    live = np.flatnonzero(seg_rows > 0)
    kids = live[np.argsort(tree.parent[live], kind="stable")]
    kid_bounds = np.searchsorted(tree.parent[kids], np.arange(-1, num_segments + 1))

    piece_of_row = np.full(num_rows, -1, dtype=np.int64)
    whole_piece = np.full(num_segments, -1, dtype=np.int64)  # a subtree placed whole
    split: list[int] = []
    pieces = 0
    under: list[int] = []  # per piece: the split segment it came from (-1: a top-level piece)
    prefix: list[int] = []  # per piece: tokens of the prefix above it, shared with its siblings
    stack = [int(s) for s in kids[kid_bounds[0] : kid_bounds[1]]]  # top-level segments with rows
    while stack:
        seg = stack.pop()
        sub = kids[kid_bounds[seg + 1] : kid_bounds[seg + 2]]
        direct = by_seg[row_bounds[seg] : row_bounds[seg + 1]]
        if tree.start[seg] + cost[seg] <= fair or (len(sub) == 0 and len(direct) <= 1):
            whole_piece[seg] = pieces
            pieces += 1
            under.append(int(tree.parent[seg]))
            prefix.append(int(tree.start[seg]))
            continue
        split.append(seg)
        stack.extend(int(s) for s in sub)
        if len(direct):  # chunks of about a fair share, each computing the prefix once more
            room = max(fair - tree.end[seg], 1.0)
            chunk = (np.cumsum(row_cost[direct]) - row_cost[direct]) // room
            piece_of_row[direct] = pieces + chunk.astype(np.int64)
            pieces += int(chunk[-1]) + 1
            under += [seg] * (int(chunk[-1]) + 1)
            prefix += [int(tree.end[seg])] * (int(chunk[-1]) + 1)
    # Rows below a whole-placed subtree inherit its piece (parents have lower ids: one pass
    # per depth, top down).
    seg_piece = whole_piece.copy()
    for d in range(2, int(tree.depth.max(initial=1)) + 1):
        seg = np.flatnonzero((tree.depth == d) & (seg_piece < 0))
        seg_piece[seg] = seg_piece[tree.parent[seg]]
    inherit = planned & in_tree & (piece_of_row < 0)
    piece_of_row[inherit] = seg_piece[tree.row_segment[inherit]]
    alone = np.flatnonzero(planned & ~in_tree)  # rows sharing nothing: one piece each
    piece_of_row[alone] = pieces + np.arange(len(alone))
    pieces += len(alone)
    under += [-1] * len(alone)
    prefix += [0] * len(alone)

    piece_cost = segment_tokens(tree, piece_of_row, order, pieces).astype(np.float64)
    np.add.at(piece_cost, piece_of_row[order], row_cost[order])
    siblings = (np.array(under, dtype=np.int64), np.array(prefix, dtype=np.int64))
    unit_of_row = merge_pieces(piece_of_row, piece_cost, siblings, order, merge * fair)
    return _units(plan, unit_of_row, order, own, out, position, workers, fair, split)


def merge_pieces(
    piece_of_row: np.ndarray,
    piece_cost: np.ndarray,
    siblings: tuple[np.ndarray, np.ndarray],
    order: np.ndarray,
    target: float,
) -> np.ndarray:
    """Consecutive pieces (by their first row in plan order) merged while the unit's cost
    stays within ``target``; a piece is never cut. ``siblings`` gives each piece the split
    segment above it and that prefix's tokens: a piece following a sibling adds its cost less
    the prefix, which the unit computes once. Returns each row's unit (-1: unplanned)."""
    under, prefix = siblings
    pieces = len(piece_cost)
    first = np.full(pieces, len(order), dtype=np.int64)
    np.minimum.at(first, piece_of_row[order], np.arange(len(order)))
    unit_of_piece = np.empty(pieces, dtype=np.int64)
    unit, filled, last = -1, target + 1, -1  # the first piece opens a unit
    for piece in np.argsort(first, kind="stable").tolist():
        sibling = last >= 0 and under[piece] >= 0 and under[piece] == under[last]
        extra = piece_cost[piece] - (prefix[piece] if sibling else 0)
        if filled + extra > target:
            unit, filled, extra = unit + 1, 0.0, piece_cost[piece]
        unit_of_piece[piece] = unit
        filled += extra
        last = piece
    unit_of_row = np.full(len(piece_of_row), -1, dtype=np.int64)
    unit_of_row[order] = unit_of_piece[piece_of_row[order]]
    return unit_of_row


def segment_tokens(tree, group_of_row: np.ndarray, order: np.ndarray, groups: int) -> np.ndarray:
    """int64 [groups]: tokens of the shared segments each group of rows reads, each once per
    group (a row reads its deepest segment and every ancestor)."""
    tokens = np.zeros(groups, dtype=np.int64)
    shared = order[tree.row_segment[order] >= 0]
    codes = np.unique(group_of_row[shared] * len(tree) + tree.row_segment[shared])
    pairs = [codes]
    while len(codes):  # (group, segment) pairs, one level up at a time
        group, seg = np.divmod(codes, len(tree))
        up = tree.parent[seg] >= 0
        codes = np.unique(group[up] * len(tree) + tree.parent[seg[up]])
        pairs.append(codes)
    group, seg = np.divmod(np.unique(np.concatenate(pairs)), max(len(tree), 1))  # each pair once
    np.add.at(tokens, group, tree.lengths[seg])
    return tokens


def _units(plan, unit_of_row, order, own, out, position, workers, fair, split) -> Split:
    """The units, each with its exact prompt tokens (its rows' segments counted once)."""
    num_units = int(unit_of_row.max(initial=-1)) + 1
    prompt = segment_tokens(plan.tree, unit_of_row, order, num_units)
    np.add.at(prompt, unit_of_row[order], own[order])
    output = np.zeros(num_units, dtype=np.int64)
    np.add.at(output, unit_of_row[order], out[order])
    rows_by_unit = order[np.argsort(unit_of_row[order], kind="stable")]
    bounds = np.searchsorted(unit_of_row[rows_by_unit], np.arange(num_units + 1))
    units = [
        WorkUnit(rows_by_unit[bounds[u] : bounds[u + 1]], int(prompt[u]), int(output[u]))
        for u in range(num_units)
    ]
    units.sort(key=lambda u: (-u.cost, int(position[u.rows[0]])))  # LPT; ties in plan order
    return Split(units, workers, fair, np.array(sorted(split), dtype=np.int64))
