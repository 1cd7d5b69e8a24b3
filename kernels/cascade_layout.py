"""Which of a step's shared-prefix groups to split at the prefix, laid out for the kernels.

A first-level group of the plan is *split* when every member's queries of this step sit
after the group's shared prefix (decodes and prefill chunks alike; not the member still
computing the prefix): its prefix keys are then read once for all the members' query rows,
and each member reads only its own keys after the prefix. The two parts are merged by
log-sum-exp. Used by the Triton, CPU and flash backends, whose kernels read this layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchrun.kernels.metadata import AttentionMetadata


def _next_power_of_2(n: int) -> int:  # kernels/triton/_common.py has Triton's; no Triton here
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class CascadeLayout:
    """The step's split groups, as the prefix kernels read them."""

    group_rows: torch.Tensor  # (Tg,) int32: query rows of the groups' members, group by group
    cu_group_rows: torch.Tensor  # (G + 1,) int32
    group_tables: torch.Tensor  # (G, Wp) int32: each group's prefix blocks
    group_prefix_len: torch.Tensor  # (G,) int32: prefix tokens (a multiple of block_size)
    kv_start: torch.Tensor  # (S,) int32: the prefix length for grouped sequences, else 0
    max_group_rows: int
    # Host copies, so a backend can size its calls without a device sync.
    kv_start_host: tuple[int, ...]  # (S,)
    group_prefix_len_host: tuple[int, ...]  # (G,)


def cascade_layout(meta: AttentionMetadata, min_saved_tokens: int) -> CascadeLayout | None:
    """The groups worth splitting — at least ``min_saved_tokens`` prefix-token reads spared,
    ``(members - 1) x prefix length`` — or None when no group is."""
    groups: dict[tuple[int, int], list[int]] = {}
    group_of = zip(meta.group_keys_host, meta.group_prefix_lens_host, strict=True)
    for i, (key, prefix_len) in enumerate(group_of):
        first_query = meta.seq_lens_host[i] - meta.q_lens_host[i]
        if key >= 0 and prefix_len >= meta.block_size and first_query >= prefix_len:
            groups.setdefault((key, prefix_len), []).append(i)
    chosen = [
        (prefix_len, members)
        for (_, prefix_len), members in groups.items()
        if (len(members) - 1) * prefix_len >= min_saved_tokens
    ]
    if not chosen:
        return None
    starts, q_lens = meta.q_starts_host, meta.q_lens_host
    rows, cu, kv_start = [], [0], [0] * len(q_lens)
    for prefix_len, members in chosen:
        for i in members:
            rows.extend(range(starts[i], starts[i] + q_lens[i]))
            kv_start[i] = prefix_len
        cu.append(len(rows))
    prefix_lens = [prefix_len for prefix_len, _ in chosen]
    max_group_rows = max(cu[g + 1] - cu[g] for g in range(len(chosen)))
    firsts = [members[0] for _, members in chosen]
    width = max(prefix_lens) // meta.block_size
    tables = meta.block_tables[firsts, :width]  # members share these columns (their prefix)
    if meta.static_shapes:
        rows, cu, prefix_lens, tables = _pad_for_graph(meta, rows, cu, prefix_lens, tables)
        max_group_rows = _next_power_of_2(max_group_rows)  # a tile-size hint: few distinct values
    device = meta.block_tables.device

    def int32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    return CascadeLayout(
        group_rows=int32(rows),
        cu_group_rows=int32(cu),
        group_tables=tables,
        group_prefix_len=int32(prefix_lens),
        kv_start=int32(kv_start),
        max_group_rows=max_group_rows,
        kv_start_host=tuple(kv_start),
        group_prefix_len_host=tuple(prefix_lens),
    )


def _pad_for_graph(
    meta: AttentionMetadata, rows: list[int], cu: list[int], prefix_lens: list[int], tables: torch.Tensor
) -> tuple[list[int], list[int], list[int], torch.Tensor]:
    """The layout padded to shapes set by the step's T, S and table width alone (CUDA graphs):
    S + 1 groups, T group rows, full-width tables. One more group with no prefix takes every
    row outside the real groups — its prefix part is out = 0, lse = -inf, so merging it leaves
    those rows exactly as they were, and each row is still merged once — then empty groups."""
    num_tokens, num_seqs, width = meta.q_starts_host[-1], len(meta.q_lens_host), meta.block_tables.shape[1]
    grouped = set(rows)
    rows = rows + [r for r in range(num_tokens) if r not in grouped]
    empty = num_seqs - len(prefix_lens)  # groups after the padding group
    cu = cu + [num_tokens] * (empty + 1)
    prefix_lens = prefix_lens + [0] * (empty + 1)
    padded = torch.full((num_seqs + 1, width), meta.null_block, dtype=tables.dtype, device=tables.device)
    padded[: tables.shape[0], : tables.shape[1]] = tables
    return rows, cu, prefix_lens, padded
