"""Log-sum-exp merge of two partial attentions over disjoint key sets (cascade's last step).

With natural-log LSEs ``a`` and ``b`` and ``m = max(a, b)``::

    out = (e^(a-m) o_a + e^(b-m) o_b) / (e^(a-m) + e^(b-m)),   lse = m + log(e^(a-m) + e^(b-m))

A side with lse = -inf (it saw no key) has weight exactly 0: the result is the other side
bit for bit (its lse too); both -inf give out = 0, lse = -inf. One program merges BLOCK_R
rows x all heads: blocks of (BLOCK_R * BLOCK_H, HEAD_DIM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchrun.kernels.triton._common import AttentionOutput, next_power_of_2


@triton.jit
def _merge_kernel(
    OA, LseA, OB, LseB, Out, LseOut, rows,  # side a (R|T, H, D), (R|T, H); side b (R, H, D), (R, H); out
    num_rows, num_heads,
    stride_at, stride_ah, stride_alt, stride_alh,
    stride_bt, stride_bh, stride_blt, stride_blh,
    stride_ot, stride_oh, stride_olt, stride_olh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # HEAD_DIM rounded up to a power of two, columns masked
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_H: tl.constexpr,  # heads, padded to a power of two
    INDEXED: tl.constexpr,  # side a and out at row rows[r] (in place into the full output), else r
):  # fmt: skip
    # BLOCK_R rows x BLOCK_H heads per program, flattened: element e = (row e // BLOCK_H, head e % BLOCK_H)
    offs = tl.arange(0, BLOCK_R * BLOCK_H)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + offs // BLOCK_H  # (BLOCK_R * BLOCK_H,) row of side b
    h = offs % BLOCK_H
    ok = (r < num_rows) & (h < num_heads)
    a_r = r  # row of side a and of the output
    if INDEXED:
        a_r = tl.load(rows + r, mask=ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_P)  # (HEAD_DIM_P,)
    ok_d = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    # lse blocks: (BLOCK_R * BLOCK_H,); o blocks: (BLOCK_R * BLOCK_H, HEAD_DIM_P)
    lse_a = tl.load(LseA + a_r * stride_alt + h * stride_alh, mask=ok, other=float("-inf"))
    lse_b = tl.load(LseB + r * stride_blt + h * stride_blh, mask=ok, other=float("-inf"))
    o_a = tl.load(
        OA + a_r[:, None] * stride_at + h[:, None] * stride_ah + offs_d[None, :], mask=ok_d, other=0.0
    ).to(tl.float32)
    o_b = tl.load(
        OB + r[:, None] * stride_bt + h[:, None] * stride_bh + offs_d[None, :], mask=ok_d, other=0.0
    ).to(tl.float32)

    m = tl.maximum(lse_a, lse_b)
    shift = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(lse_a - shift)  # exactly 0 where lse_a = -inf
    w_b = tl.exp(lse_b - shift)
    total = w_a + w_b
    num = w_a[:, None] * o_a + w_b[:, None] * o_b
    out = num / tl.where(total > 0, total, 1.0)[:, None]
    # -inf on one side: the other side exactly, whatever the empty side's o holds; both: 0
    out = tl.where((lse_b == float("-inf"))[:, None], o_a, out)
    out = tl.where((lse_a == float("-inf"))[:, None], o_b, out)
    out = tl.where((total > 0)[:, None], out, 0.0)
    lse = tl.where(total > 0, shift + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))

    tl.store(
        Out + a_r[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=ok_d,
    )
    tl.store(LseOut + a_r * stride_olt + h * stride_olh, lse, mask=ok)


def _launch(o_a, lse_a, o_b, lse_b, out, lse_out, rows) -> None:
    num_rows, num_heads, head_dim = o_b.shape
    if (
        o_a.shape[1:] != o_b.shape[1:]
        or lse_a.shape != o_a.shape[:2]
        or lse_b.shape != o_b.shape[:2]
        or (rows is None and o_a.shape != o_b.shape)
    ):
        raise ValueError(
            f"partial attentions do not match: o {tuple(o_a.shape)} / {tuple(o_b.shape)}, "
            f"lse {tuple(lse_a.shape)} / {tuple(lse_b.shape)}"
        )
    if o_a.stride(2) != 1 or o_b.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("outputs must be contiguous in the head dim")
    if num_rows == 0:
        return
    block_h = next_power_of_2(num_heads)
    block_r = max(1, 64 // block_h)
    _merge_kernel[(triton.cdiv(num_rows, block_r),)](
        o_a, lse_a, o_b, lse_b, out, lse_out, rows if rows is not None else lse_a,
        num_rows, num_heads,
        *o_a.stride()[:2], *lse_a.stride(),
        *o_b.stride()[:2], *lse_b.stride(),
        *out.stride()[:2], *lse_out.stride(),
        HEAD_DIM=head_dim, HEAD_DIM_P=next_power_of_2(head_dim), BLOCK_R=block_r, BLOCK_H=block_h,
        INDEXED=rows is not None,
    )  # fmt: skip


def merge_attention(
    o_a: torch.Tensor,  # (R, H, D)
    lse_a: torch.Tensor,  # (R, H) float32, natural log
    o_b: torch.Tensor,  # (R, H, D)
    lse_b: torch.Tensor,  # (R, H) float32, natural log
) -> AttentionOutput:
    """Merge two partial attentions row by row; returns ``AttentionOutput(out (R, H, D) in
    o_a's dtype, lse (R, H) float32)``."""
    out = torch.empty_like(o_a)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=lse_a.device)
    _launch(o_a, lse_a, o_b, lse_b, out, lse, None)
    return AttentionOutput(out, lse)


def merge_attention_into(
    out: torch.Tensor,  # (T, H, D): the full output, updated in place at `rows`
    lse: torch.Tensor,  # (T, H) float32: its LSE, updated in place at `rows`
    rows: torch.Tensor,  # (R,) int32 / int64: distinct rows of `out`
    o_part: torch.Tensor,  # (R, H, D): another partial attention of those rows
    lse_part: torch.Tensor,  # (R, H)
) -> None:
    """``out[rows], lse[rows] = merge(out[rows], lse[rows], o_part, lse_part)`` in one launch,
    with no gather or scatter copies (cascade: the prefix part into the own-suffix result)."""
    if rows.shape != (o_part.shape[0],):
        raise ValueError(f"rows must be ({o_part.shape[0]},); got {tuple(rows.shape)}")
    if lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32, got {lse.dtype}")
    # Each program reads row rows[r] of out / lse, then writes it; rows are distinct, so no
    # program reads what another one writes.
    _launch(out, lse, o_part, lse_part, out, lse, rows)
