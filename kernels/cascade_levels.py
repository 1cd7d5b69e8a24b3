"""A step's shared prefixes at every depth (system prompt ▸ document ▸ ...), found in its block
tables, laid out for the CPU kernel's prefix passes.

Sequences that share a prefix hold the same KV blocks for it: the plan's groups are computed
once and reference-counted, so block ids say exactly who shares what. A *span* is a run of
block-table columns that several sequences of the step hold in common, which all of them have
finished computing (every member's queries of this step come after it). Spans nest: the
sequences sharing the system prompt split, where their tables next differ, into those sharing
a document, and so on. Level ``d`` holds the spans at depth ``d``; a sequence's keys are then
read level by level — each span once for all of its members' query rows — and its own keys
after its deepest span last, the parts merged by log-sum-exp.

A span is kept where it spares at least ``min_saved_tokens`` key reads,
``(members - 1) x span tokens``; a deeper span is looked for only inside a kept one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchrun.kernels.metadata import AttentionMetadata


@dataclass(frozen=True)
class SpanLevel:
    """One depth's spans, as the kernel's non-causal items read them (all int32)."""

    rows: torch.Tensor  # (R,) query rows of the spans' members, span by span
    cu_rows: torch.Tensor  # (N + 1,)
    tables: torch.Tensor  # (N, W) a member's block table per span
    key_begin: torch.Tensor  # (N,) first key position of the span
    key_end: torch.Tensor  # (N,) one past its last


@dataclass(frozen=True)
class CascadeLevels:
    levels: tuple[SpanLevel, ...]  # outermost first
    kv_start: torch.Tensor  # (S,) int32: where each sequence's own keys begin (its deepest span's end)


def cascade_levels(meta: AttentionMetadata, min_saved_tokens: int) -> CascadeLevels | None:
    """The step's nested spans, or None when no span is worth reading once (CPU tensors)."""
    block = meta.block_size
    tables = meta.block_tables.numpy()
    q_lens, seq_lens = np.asarray(meta.q_lens_host), np.asarray(meta.seq_lens_host)
    done_blocks = (seq_lens - q_lens) // block  # whole blocks every query of the sequence comes after
    kv_start = np.zeros(len(q_lens), dtype=np.int64)
    levels: list[SpanLevel] = []
    frontier = [(np.flatnonzero(done_blocks > 0), 0)]  # (sequences, first column still to match)
    while frontier:
        spans = []
        for members, column in frontier:
            spans += _spans_from(members, column, tables, done_blocks, min_saved_tokens, block)
        if not spans:
            break
        for members, _, end in spans:
            kv_start[members] = end * block
        levels.append(_level(spans, tables, meta, block))
        frontier = [(members, end) for members, _, end in spans]
    if not levels:
        return None
    return CascadeLevels(tuple(levels), torch.from_numpy(kv_start.astype(np.int32)))


def _spans_from(
    members: np.ndarray, column: int, tables: np.ndarray, done_blocks: np.ndarray, min_saved: int, block: int
) -> list[tuple[np.ndarray, int, int]]:
    """Spans starting at ``column`` among ``members``: (sequences, first column, end column)."""
    members = members[done_blocks[members] > column]
    if len(members) < 2:
        return []
    ids = tables[members, column]
    order = np.argsort(ids, kind="stable")
    members, ids = members[order], ids[order]
    bounds = np.flatnonzero(np.diff(ids)) + 1
    spans = []
    for part in np.split(members, bounds):
        if len(part) < 2:
            continue
        limit = int(done_blocks[part].min())
        same = (tables[part, column:limit] == tables[part[0], column:limit]).all(axis=0)
        end = column + (int(np.argmin(same)) if not same.all() else limit - column)
        if (len(part) - 1) * (end - column) * block >= min_saved:
            spans.append((part, column, end))
    return spans


def _level(spans, tables: np.ndarray, meta: AttentionMetadata, block: int) -> SpanLevel:
    starts, q_lens = meta.q_starts_host, meta.q_lens_host
    rows = [np.arange(starts[i], starts[i] + q_lens[i]) for members, _, _ in spans for i in members]
    counts = [sum(q_lens[i] for i in members) for members, _, _ in spans]
    first_members = [int(members[0]) for members, _, _ in spans]

    def int32(values) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int32))

    return SpanLevel(
        rows=int32(np.concatenate(rows)),
        cu_rows=int32(np.concatenate([[0], np.cumsum(counts)])),
        tables=int32(tables[first_members]),
        key_begin=int32([column * block for _, column, _ in spans]),
        key_end=int32([end * block for _, _, end in spans]),
    )
