"""Varlen paged attention in Triton: prefill chunks and decodes of one packed step, one launch.

The step packs T query tokens from S sequences back to back (``cu_seqlens_q``); sequence i
has ``seq_lens[i]`` keys in the cache after this step, so its queries sit at positions
``seq_lens[i] - q_len_i .. seq_lens[i] - 1``. The grid is (flat query tiles, kv heads)::

    program (t, h):  sequence i, tile j = find_tile(t)  (a binary search over cu_seqlens_q)
                     rows = query tokens j*BLOCK_Q .. of sequence i  x  the G query heads of kv head h
                     keys = sequence i's cache positions [lo, hi), read through block_tables[i]

``T // BLOCK_Q + S`` flat tiles cover any mix of decodes and chunks without a device sync;
the few spare ones return at once.

GQA heads are packed into the query tile (row r = token r // G, head h*G + r % G), so a
decode step with G = 8 still fills 8 rows of the tile from one token, and each K/V tile is
read once for all G heads. Keys are gathered position by position through the block table
(``page = block_tables[i, pos // block_size]``), in place: nothing is copied into a dense
buffer, the tile width does not depend on the block size, and table entries past
``seq_lens[i]`` (the null-block padding) are never loaded.

Per tile the kernel is the fused-attention tutorial's loop: scores ``q @ k^T`` (fp32), mask,
online softmax in base 2 (exp2), ``acc = acc * alpha + p @ v``. The LSE it returns is natural
log (``lse = (m + log2 l) * ln 2``). A row that sees no key (``kv_start`` at or past its
position, or an empty window) gets out = 0 and lse = -inf, so a later merge ignores it.

Split-KV (split_kv.py): a step of a few long decodes would give few programs, each walking
a whole context; with ``num_splits`` > 1 a third grid axis cuts each tile's keys into runs
of whole key tiles, every program writes a partial (out fp32, lse) and one more launch
reduces the splits. Causal tiles are masked everywhere, not only on the diagonal (this
changes no result).
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
def _paged_attention_kernel(
    Q, K, V, Out, Lse,  # (T, Hq, D), (num_blocks, block_size, Hkv, D) x2, ([NS,] T, Hq, D), ([NS,] T, Hq)
    cu_seqlens_q, seq_lens, kv_start, block_tables,  # (S + 1,), (S,), (S,), (S, W) int32
    num_seqs, scale, softcap, window,
    stride_qt, stride_qh, stride_os, stride_ot, stride_oh, stride_ls, stride_lt, stride_lh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bs, stride_bw,
    G: tl.constexpr,  # query heads per kv head
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    HEAD_DIM: tl.constexpr,  # the model's; any
    HEAD_DIM_P: tl.constexpr,  # HEAD_DIM rounded up to a power of two (tl.arange), columns masked
    BLOCK_Q: tl.constexpr,  # query tokens per tile; BLOCK_Q * G <= BLOCK_M
    BLOCK_M: tl.constexpr,  # rows per tile, (token, head) pairs: a power of two >= 16
    BLOCK_N: tl.constexpr,  # keys per tile
    CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr, WRITE_LSE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,  # > 1: Out / Lse are the fp32 partials of split program_id(2)
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seq, q_tile = find_tile(cu_seqlens_q, tl.program_id(0), num_seqs, BLOCK_Q)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    q_begin = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_begin
    if q_tile * BLOCK_Q >= q_len:  # a spare tile of the flat grid
        return
    seq_len = tl.load(seq_lens + seq)
    first_pos = seq_len - q_len  # cache position of the sequence's first query of this step

    # -- the query tile: BLOCK_M rows = (token, head) pairs ---------------------------------
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    q_idx = q_tile * BLOCK_Q + offs_m // G  # query token within the sequence
    head = kv_head * G + offs_m % G  # query head
    row_ok = (offs_m < BLOCK_Q * G) & (q_idx < q_len)
    q_pos = first_pos + q_idx  # (BLOCK_M,) cache position of each row's token
    row = (q_begin + q_idx).to(tl.int64)  # (BLOCK_M,) row of the packed step
    offs_d = tl.arange(0, HEAD_DIM_P)  # (HEAD_DIM_P,)
    d_ok = offs_d < HEAD_DIM  # padding columns load as 0: no score or output changes
    # q block: (BLOCK_M, HEAD_DIM_P)
    q = tl.load(
        Q + row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    # -- the keys this tile may see: [lo, hi) ----------------------------------------------
    lo = 0
    if HAS_KV_START:
        lo = tl.load(kv_start + seq)
    if USE_WINDOW:  # key pos > query pos - window, for the tile's first query
        lo = tl.maximum(lo, first_pos + q_tile * BLOCK_Q - window + 1)
    hi = seq_len
    if CAUSAL:  # up to the tile's last query
        hi = tl.minimum(seq_len, first_pos + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len))

    # this program's split of them: whole key tiles [tile_lo, tile_hi)
    tile_lo, tile_hi = split_key_range((lo // BLOCK_N) * BLOCK_N, hi, split, NUM_SPLITS, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, base 2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)

    # -- the tile loop over the sequence's keys, through its block table --------------------
    table = block_tables + seq.to(tl.int64) * stride_bs
    for start_n in range(tile_lo, tile_hi, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) cache positions
        key_ok = (pos >= lo) & (pos < hi)
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
        visible = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            visible &= pos[None, :] <= q_pos[:, None]
        if USE_WINDOW:
            visible &= pos[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))

        # online softmax: rescale what was accumulated, add this tile
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
        Out + split * stride_os + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    if WRITE_LSE or NUM_SPLITS > 1:
        tl.store(Lse + split * stride_ls + row * stride_lt + head * stride_lh, lse, mask=row_ok)


def paged_attention(
    query: torch.Tensor,  # (T, Hq, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    cu_seqlens_q: torch.Tensor,  # (S + 1,) int32
    seq_lens: torch.Tensor,  # (S,) int32: keys in the cache after this step
    block_tables: torch.Tensor,  # (S, W) int32, padded with the null block
    scale: float,
    *,
    kv_start: torch.Tensor | None = None,  # (S,) int32: keys before it are skipped
    causal: bool = True,
    softcap: float | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
    max_q_len: int | None = None,  # longest chunk of the step: a tile-size hint, never synced
    max_kv_len: int | None = None,  # most keys any sequence reads (after kv_start): a split hint
    num_splits: int | None = None,  # key splits per program; None: choose_num_splits
) -> torch.Tensor | AttentionOutput:
    """Attention of every packed query over its sequence's paged keys, one launch.

    Returns out (T, Hq, D) in the query dtype, or ``AttentionOutput(out, lse)`` with the
    natural-log LSE (T, Hq) float32 when ``return_lse``. ``causal=False`` lets every query of
    a sequence see all ``seq_lens[i]`` keys. ``sliding_window=w`` keeps keys with
    ``pos > query_pos - w``; ``softcap=c`` applies ``c * tanh(s / c)`` to the scaled scores.
    ``num_splits`` > 1 walks each tile's keys in that many programs and reduces them (split-KV;
    by default only on a GPU the launch would underfill, given ``max_kv_len``)."""
    block_size, num_kv_heads, group = check_cache(query, k_cache, v_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and block_tables {tuple(block_tables.shape)} "
            f"do not match {num_seqs} sequences"
        )
    if kv_start is not None and kv_start.shape != (num_seqs,):
        raise ValueError(f"kv_start must be ({num_seqs},); got {tuple(kv_start.shape)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")

    out = torch.empty_like(query)
    lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return AttentionOutput(out, lse) if return_lse else out
    # Tile rows for the longest chunk if known, else for the mean one (T / S, no sync).
    hint = max_q_len if max_q_len is not None else -(-num_tokens // num_seqs)
    block_q, block_m = query_tile(hint, group, cap=32 if head_dim > 128 else 64)
    tiles = num_tokens // block_q + num_seqs  # flat query tiles (see find_tile)
    num_splits, part_out, part_lse = plan_splits(num_splits, tiles * num_kv_heads, max_kv_len, out, lse)
    _paged_attention_kernel[(tiles, num_kv_heads, num_splits)](
        query, k_cache, v_cache, part_out, part_lse,
        cu_seqlens_q, seq_lens, kv_start if kv_start is not None else seq_lens, block_tables,
        num_seqs, float(scale), float(softcap or 0.0), int(sliding_window or 0),
        query.stride(0), query.stride(1),
        *split_strides(part_out, num_splits), *split_strides(part_lse, num_splits),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        *block_tables.stride(),
        G=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_DIM_P=next_power_of_2(head_dim),
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=64 if head_dim <= 64 else 32,
        CAUSAL=causal, HAS_KV_START=kv_start is not None, USE_SOFTCAP=bool(softcap),
        USE_WINDOW=sliding_window is not None, WRITE_LSE=return_lse, NUM_SPLITS=num_splits,
        **dot_flags(query.dtype, query.device),
    )  # fmt: skip
    if num_splits > 1:
        reduce_splits(part_out, part_lse, out, lse if return_lse else None)
    return AttentionOutput(out, lse) if return_lse else out
