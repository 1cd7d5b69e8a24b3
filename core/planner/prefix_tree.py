"""The global prefix tree: which KV blocks of which prompts are shared, found in NumPy.

The tree is built over KV *blocks*, not tokens, because a block is the unit the engine can
share: a node at level ``j`` is a distinct run of prompt tokens ``[0, (j + 1) * block_size)``.
Level by level, every prompt still sharing its prefix with another one contributes its
next block; ``np.unique`` over (parent node, block tokens) gives the nodes of the level
and how many prompts pass through each. A prompt leaves the loop as soon as its node has
a single user: its remaining tokens are its own. The work is therefore proportional to
the *shared* tokens, done in C, with no Python object per token.

Nodes are keyed by a 64-bit hash of (parent, block) for speed; every member of a node is
then compared token by token with the node's first member, and a level with a hash
collision is redone with exact row-wise ``np.unique``. The tree is exact.

Only full blocks strictly before a prompt's last token are shared: the last prompt token
is always computed by its own request, because its logits start the generation (vLLM's
prefix cache has the same rule). With block size 1 the shared nodes are therefore exactly
the trie nodes of ``prompt[:-1]`` that two or more prompts pass through.

A *segment* is a maximal chain of nodes with the same users: it starts where the set of
users changes and ends where it changes again. Segments nest (system prompt > document >
question); each prompt's deepest segment fixes its whole chain of shared prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchrun.core.planner.prompt_tokens import PromptTokens

_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True, eq=False)
class SegmentTree:
    """Shared segments, numbered so that a parent always comes before its children.

    All arrays of shape ``[num_segments]`` except ``row_segment`` (``[num_rows]``).
    Segment ``s`` covers prompt positions ``[start[s], end[s])`` (block aligned) and
    ``start[s] == end[parent[s]]`` (or 0 at the top).
    """

    block_size: int
    parent: np.ndarray  # int64, -1 for a top-level segment
    start: np.ndarray  # int64
    end: np.ndarray  # int64
    users: np.ndarray  # int64, prompts whose prefix includes the segment (>= 2)
    depth: np.ndarray  # int64, 1 for a top-level segment
    first_row: np.ndarray  # int64, the lowest row index among the users
    row_segment: np.ndarray  # int64 [num_rows], each row's deepest segment, -1 if none

    def __len__(self) -> int:
        return len(self.parent)

    @property
    def lengths(self) -> np.ndarray:
        return self.end - self.start

    def shared_length(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Prompt tokens of each row covered by shared segments (0 for a row with none)."""
        seg = self.row_segment if rows is None else self.row_segment[rows]
        ends = np.append(self.end, 0)  # index -1 (no segment) reads the appended 0
        return ends[seg]

    def path(self, segment: int) -> list[int]:
        """Segment ids from the top-level ancestor down to ``segment``."""
        chain = []
        while segment >= 0:
            chain.append(int(segment))
            segment = self.parent[segment]
        return chain[::-1]


def build_segment_tree(prompts: PromptTokens, runnable: np.ndarray, block_size: int) -> SegmentTree:
    """The shared segments among the ``runnable`` rows of ``prompts`` (a bool mask)."""
    nodes = _block_trie(prompts, runnable, block_size)
    return _segments(nodes, len(prompts), block_size)


@dataclass
class _Nodes:
    """Shared nodes of the block trie (>= 2 users), numbered level by level."""

    parent: np.ndarray  # int64, -1 at level 0
    level: np.ndarray  # int64
    users: np.ndarray  # int64
    first_row: np.ndarray  # int64
    row_node: np.ndarray  # int64 [num_rows], each row's deepest shared node, -1 if none


def _block_trie(prompts: PromptTokens, runnable: np.ndarray, block_size: int) -> _Nodes:
    tokens, offsets = prompts.tokens, prompts.offsets
    shareable_blocks = np.where(runnable, np.maximum(prompts.lengths - 1, 0) // block_size, 0)
    row_node = np.full(len(prompts), -1, dtype=np.int64)
    parents, levels, users, first_rows = [], [], [], []
    num_nodes = 0

    active = np.flatnonzero(shareable_blocks >= 1)  # ascending row indices, kept ascending
    parent = np.full(len(active), -1, dtype=np.int64)  # each active row's node one level up
    columns = np.arange(block_size, dtype=np.int64)
    level = 0
    while len(active) >= 2:
        blocks = tokens[(offsets[active] + level * block_size)[:, None] + columns]  # [A, block_size]
        first, inverse, counts = _group(blocks, parent)
        shared = counts >= 2
        node_id = np.full(len(counts), -1, dtype=np.int64)
        node_id[shared] = num_nodes + np.arange(int(shared.sum()))
        num_nodes += int(shared.sum())
        parents.append(parent[first[shared]])
        levels.append(np.full(int(shared.sum()), level, dtype=np.int64))
        users.append(counts[shared])
        first_rows.append(active[first[shared]])

        mine = node_id[inverse]  # each active row's node at this level (-1: not shared)
        keep = mine >= 0
        active, parent = active[keep], mine[keep]
        row_node[active] = parent
        level += 1
        more = shareable_blocks[active] > level
        active, parent = active[more], parent[more]

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    return _Nodes(cat(parents), cat(levels), cat(users), cat(first_rows), row_node)


def _group(blocks: np.ndarray, parent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by (parent, block): (first member of each group, group of each row, sizes).

    Groups are numbered in the order of their first member, so results do not depend on
    hash values."""
    key = _hash_rows(blocks, parent)
    _, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    rep = first[inverse]
    if not (np.array_equal(blocks, blocks[rep]) and np.array_equal(parent, parent[rep])):
        # A 64-bit collision: astronomically rare, but the tree must be exact.
        exact = np.ascontiguousarray(np.column_stack([parent, blocks.astype(np.int64)]))
        _, first, inverse, counts = np.unique(
            exact, axis=0, return_index=True, return_inverse=True, return_counts=True
        )
        inverse = inverse.reshape(-1)
    by_first = np.argsort(first, kind="stable")
    renumber = np.empty_like(by_first)
    renumber[by_first] = np.arange(len(by_first))
    return first[by_first], renumber[inverse], counts[by_first]


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _MIX
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hash_rows(blocks: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of ``blocks`` [A, block_size] together with its parent [A]."""
    with np.errstate(over="ignore"):
        h = _splitmix(parent.astype(np.uint64))
        for column in blocks.T:  # block_size passes over A values; cheap next to np.unique
            h = _splitmix(h ^ column.astype(np.uint64))
    return h


def _segments(nodes: _Nodes, num_rows: int, block_size: int) -> SegmentTree:
    """Collapse chains of nodes with unchanged users into segments."""
    n = len(nodes.parent)
    has_parent = nodes.parent >= 0
    parent_users = np.where(has_parent, nodes.users[np.maximum(nodes.parent, 0)], -1)
    starts_segment = nodes.users != parent_users  # a top-level node, or its users changed
    segment_of = np.empty(n, dtype=np.int64)
    start_nodes = np.flatnonzero(starts_segment)
    segment_of[start_nodes] = np.arange(len(start_nodes))
    # Levels are contiguous id ranges, parents before children: propagate level by level.
    level_bounds = np.searchsorted(nodes.level, np.arange(int(nodes.level.max(initial=-1)) + 2))
    for lo, hi in zip(level_bounds[:-1], level_bounds[1:], strict=True):
        cont = np.flatnonzero(~starts_segment[lo:hi]) + lo
        segment_of[cont] = segment_of[nodes.parent[cont]]

    num_segments = len(start_nodes)
    end_level = np.full(num_segments, -1, dtype=np.int64)
    np.maximum.at(end_level, segment_of, nodes.level)
    top = nodes.parent[start_nodes] < 0
    parent = np.where(top, -1, segment_of[np.maximum(nodes.parent[start_nodes], 0)])
    depth = np.ones(num_segments, dtype=np.int64)
    for s in np.flatnonzero(~top):  # parents come first; one pass over segments, not tokens
        depth[s] = depth[parent[s]] + 1
    row_segment = np.full(num_rows, -1, dtype=np.int64)
    has = nodes.row_node >= 0
    row_segment[has] = segment_of[nodes.row_node[has]]
    return SegmentTree(
        block_size=block_size,
        parent=parent,
        start=nodes.level[start_nodes] * block_size,
        end=(end_level + 1) * block_size,
        users=nodes.users[start_nodes],
        depth=depth,
        first_row=nodes.first_row[start_nodes],
        row_segment=row_segment,
    )
