"""Shared-prefix (cascade) attention in Triton: every first-level group's prefix part, one launch.

A plan group g of R sequences shares its first ``group_prefix_len[g]`` cache positions
(``group_tables[g]``). All of the group's queries sit after the prefix, so their attention
over the prefix is non-causal: the same keys for every query. Hydragen / BatchLLM batch the
group's queries into one matrix so each prefix K/V tile is loaded once and multiplied
against all of them, instead of once per sequence (FlashInfer's cascade "shared prefix"
pass). The grid is (flat query tiles, kv heads), as in paged_attention.py::

    program (t, h):  group g, tile j = find_tile(t)  (a binary search over cu_group_rows)
                     rows = group g's queries j*BLOCK_Q .. (group_rows[cu_group_rows[g] + ...])
                            x  the G query heads of kv head h
                     keys = positions [0, group_prefix_len[g]) through group_tables[g]

A tile holds up to 128 rows (64 for D > 64), so a group of up to 128 / G queries reads
its prefix exactly once per kv head; a larger group reads it once per tile of queries.

A few groups with long prefixes give few programs; ``num_splits`` > 1 cuts each prefix into
runs of whole key tiles walked by separate programs, reduced by one more launch (split_kv.py).

The result is a partial attention: ``(out, lse)`` over the prefix keys only, natural-log
LSE, to be merged (merge.py) with each query's attention over its own keys after the prefix
(``paged_attention(..., kv_start=prefix_len)``). No sliding window here (the prefix part
knows no query positions); the soft-cap is supported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchrun.kernels.triton._common import (
    AttentionOutput,
    check_cache,
    dot_flags,
    find_tile,
    finish,
    next_power_of_2,
    online_softmax_step,
    query_tile,
    scores_base2,
    weighted_values,
)
from batchrun.kernels.triton.split_kv import (
    plan_splits,
    reduce_splits,
    split_key_range,
    split_strides,
)


@triton.jit
def _prefix_attention_kernel(
    Q, K, V, Out, Lse,  # (T, Hq, D), (num_blocks, block_size, Hkv, D) x2, ([NS,] Tg, Hq, D), ([NS,] Tg, Hq)
    group_rows, cu_group_rows, group_tables, group_prefix_len,  # (Tg,), (NG + 1,), (NG, W), (NG,) int32
    num_groups, scale, softcap,
    stride_qt, stride_qh, stride_os, stride_ot, stride_oh, stride_ls, stride_lt, stride_lh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bg, stride_bw,
    G: tl.constexpr,  # query heads per kv head
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    HEAD_DIM: tl.constexpr,  # the model's; any
    HEAD_DIM_P: tl.constexpr,  # HEAD_DIM rounded up to a power of two (tl.arange), columns masked
    BLOCK_Q: tl.constexpr,  # group queries per tile; BLOCK_Q * G <= BLOCK_M
    BLOCK_M: tl.constexpr,  # rows per tile, (query, head) pairs: a power of two >= 16
    BLOCK_N: tl.constexpr,  # keys per tile
    USE_SOFTCAP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,  # > 1: Out / Lse are the fp32 partials of split program_id(2)
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    grp, q_tile = find_tile(cu_group_rows, tl.program_id(0), num_groups, BLOCK_Q)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    r_begin = tl.load(cu_group_rows + grp)
    num_rows = tl.load(cu_group_rows + grp + 1) - r_begin
    if q_tile * BLOCK_Q >= num_rows:  # a spare tile of the flat grid
        return
    prefix_len = tl.load(group_prefix_len + grp)

    # -- the query tile: BLOCK_M rows = (group member's query, head) pairs -------------------
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    q_idx = q_tile * BLOCK_Q + offs_m // G  # the query's index within the group
    head = kv_head * G + offs_m % G
    row_ok = (offs_m < BLOCK_Q * G) & (q_idx < num_rows)
    out_row = (r_begin + q_idx).to(tl.int64)  # (BLOCK_M,) row of the output (group_rows order)
    q_row = tl.load(group_rows + out_row, mask=row_ok, other=0).to(tl.int64)  # row of `query`
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM  # padding columns load as 0: no score or output changes
    # q block: (BLOCK_M, HEAD_DIM_P), gathered from the packed step
    q = tl.load(
        Q + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)

    # -- the tile loop over the shared prefix: each K/V tile read once for the whole tile ----
    table = group_tables + grp.to(tl.int64) * stride_bg
    tile_lo, tile_hi = split_key_range(0, prefix_len, split, NUM_SPLITS, BLOCK_N)  # this split's keys
    for start_n in range(tile_lo, tile_hi, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        key_ok = pos < prefix_len
        page = tl.load(table + (pos // BLOCK_SIZE) * stride_bw, mask=key_ok, other=0).to(tl.int64)
        in_page = pos % BLOCK_SIZE
        # k block, transposed: (HEAD_DIM_P, BLOCK_N)
        k = tl.load(
            K
            + page[None, :] * stride_kb
            + in_page[None, :] * stride_ks
            + kv_head * stride_kh
            + offs_d[:, None],
            mask=d_ok[:, None] & key_ok[None, :],
            other=0.0,
        )
        s = scores_base2(q, k, scale, softcap, USE_SOFTCAP, DOT_FP32, PRECISION)  # (BLOCK_M, BLOCK_N)
        s = tl.where(row_ok[:, None] & key_ok[None, :], s, float("-inf"))  # non-causal

        p, alpha, m_i, l_i = online_softmax_step(m_i, l_i, s)
        # v block: (BLOCK_N, HEAD_DIM_P)
        v = tl.load(
            V
            + page[:, None] * stride_vb
            + in_page[:, None] * stride_vs
            + kv_head * stride_vh
            + offs_d[None, :],
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + weighted_values(p, v, DOT_FP32, PRECISION)

    out, lse = finish(acc, m_i, l_i)
    # out block: (BLOCK_M, HEAD_DIM_P); lse block: (BLOCK_M,)
    tl.store(
        Out + split * stride_os + out_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(Lse + split * stride_ls + out_row * stride_lt + head * stride_lh, lse, mask=row_ok)


def prefix_attention(
    query: torch.Tensor,  # (T, Hq, D): the packed step
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    group_rows: torch.Tensor,  # (Tg,) int32: rows of `query`, group by group
    cu_group_rows: torch.Tensor,  # (NG + 1,) int32: group g owns group_rows[cu[g]:cu[g+1]]
    group_tables: torch.Tensor,  # (NG, W) int32: each group's prefix blocks
    group_prefix_len: torch.Tensor,  # (NG,) int32: shared positions (normally a multiple of block_size)
    scale: float,
    softcap: float | None = None,
    *,
    max_group_rows: int | None = None,  # largest group: a tile-size hint, never synced
    max_prefix_len: int | None = None,  # longest prefix: a split hint, never synced
    num_splits: int | None = None,  # key splits per program; None: choose_num_splits
) -> AttentionOutput:
    """Each group's queries against its shared prefix keys, non-causal, all groups in one launch.

    Returns ``AttentionOutput(out (Tg, Hq, D), lse (Tg, Hq) float32 natural log)`` in
    ``group_rows`` order; a group with prefix length 0 gives out = 0, lse = -inf.
    ``num_splits`` > 1 walks each prefix in that many programs and reduces them (split-KV;
    by default only on a GPU the launch would underfill, given ``max_prefix_len``)."""
    block_size, num_kv_heads, group = check_cache(query, k_cache, v_cache)
    num_heads, head_dim = query.shape[1:]
    num_groups = group_prefix_len.shape[0]
    if cu_group_rows.shape != (num_groups + 1,) or group_tables.shape[0] != num_groups:
        raise ValueError(
            f"cu_group_rows {tuple(cu_group_rows.shape)} and group_tables {tuple(group_tables.shape)} "
            f"do not match {num_groups} groups"
        )

    num_rows = group_rows.shape[0]
    out = torch.empty((num_rows, num_heads, head_dim), dtype=query.dtype, device=query.device)
    lse = torch.empty((num_rows, num_heads), dtype=torch.float32, device=query.device)
    if num_rows == 0 or num_groups == 0:
        return AttentionOutput(out, lse)
    # As many rows as the largest group has (if known, else the mean one), up to 128 / 64.
    hint = max_group_rows if max_group_rows is not None else -(-num_rows // num_groups)
    block_q, block_m = query_tile(hint, group, cap=64 if head_dim > 64 else 128)
    tiles = num_rows // block_q + num_groups  # flat query tiles (see find_tile)
    num_splits, part_out, part_lse = plan_splits(num_splits, tiles * num_kv_heads, max_prefix_len, out, lse)
    _prefix_attention_kernel[(tiles, num_kv_heads, num_splits)](
        query, k_cache, v_cache, part_out, part_lse,
        group_rows, cu_group_rows, group_tables, group_prefix_len,
        num_groups, float(scale), float(softcap or 0.0),
        query.stride(0), query.stride(1),
        *split_strides(part_out, num_splits), *split_strides(part_lse, num_splits),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        *group_tables.stride(),
        G=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_DIM_P=next_power_of_2(head_dim),
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=64 if head_dim <= 64 else 32,
        USE_SOFTCAP=bool(softcap), NUM_SPLITS=num_splits, **dot_flags(query.dtype, query.device),
    )  # fmt: skip
    if num_splits > 1:
        reduce_splits(part_out, part_lse, out, lse)
    return AttentionOutput(out, lse)
