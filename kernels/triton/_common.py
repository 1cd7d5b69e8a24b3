"""Pieces the Triton attention kernels share: score transform, online-softmax finish, launch checks.

Every kernel here works in base 2 inside (``exp2`` / ``log2``, as Triton's fused-attention
tutorial does): scores are multiplied by ``log2(e)`` once, the running max ``m`` and sum ``l``
are base 2, and the log-sum-exp handed back to Python is converted to natural log,
``lse = (m + log2(l)) * ln 2``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from batchrun.kernels.triton.capabilities import CAPABILITIES, supported_block_size, supported_head_dim

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # natural-log scores * LOG2E = base-2 scores
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # base-2 LSE * LN2 = natural-log LSE


class AttentionOutput(NamedTuple):
    """A (partial) attention result, ready to be merged with another over disjoint keys."""

    out: torch.Tensor  # (rows, Hq, D), the query dtype
    lse: torch.Tensor  # (rows, Hq) float32, natural log; -inf where a row saw no key


@triton.jit
def find_tile(cu_seqlens, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Which sequence a flat query tile belongs to, and its tile index within that sequence.

    Sequence i owns flat tiles ``[cu[i] // BLOCK_Q + i, cu[i+1] // BLOCK_Q + i + 1)``: at
    least ``ceil(q_len_i / BLOCK_Q)`` of them, so ``T // BLOCK_Q + S`` flat tiles cover any
    step and the grid needs no device sync (the trick of vLLM's unified Triton attention).
    A binary search over that monotone start; the caller skips tiles past its q_len."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    return seq, tile - (tl.load(cu_seqlens + seq) // BLOCK_Q + seq)


def query_tile(rows_hint: int, group: int, cap: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_M): rows = BLOCK_Q tokens x G heads, a power of two in [16, cap], enough
    for ``rows_hint`` tokens when it fits (BLOCK_Q >= 1 for any G <= 16)."""
    block_m = min(max(16, next_power_of_2(rows_hint * group)), cap)
    block_m = max(block_m, next_power_of_2(group))
    return block_m // group, block_m


@triton.jit
def tanh(x):
    """tanh from exp, for the soft-cap (no libdevice, so it also runs in the interpreter).

    ``tanh(|x|) = (1 - e^(-2|x|)) / (1 + e^(-2|x|))``: never overflows; absolute error ~1e-7."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def scores_base2(
    q, k, scale, softcap, USE_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr
):
    """``q @ k`` in fp32 → scaled (and soft-capped: ``cap * tanh(s / cap)``) → base 2.

    q: (BLOCK_M, HEAD_DIM), k: (HEAD_DIM, BLOCK_N) → (BLOCK_M, BLOCK_N) fp32."""
    if DOT_FP32:
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision=PRECISION)
    else:
        s = tl.dot(q, k, input_precision=PRECISION)
    s = s * scale
    if USE_SOFTCAP:
        s = softcap * tanh(s / softcap)
    return s * LOG2E


@triton.jit
def weighted_values(p, v, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``p @ v`` with p cast to the cache dtype first (as flash attention does); fp32 result.

    p: (BLOCK_M, BLOCK_N) fp32, v: (BLOCK_N, HEAD_DIM) → (BLOCK_M, HEAD_DIM) fp32."""
    p = p.to(v.dtype)
    if DOT_FP32:
        return tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision=PRECISION)
    return tl.dot(p, v, input_precision=PRECISION)


@triton.jit
def online_softmax_step(m_i, l_i, s):
    """Fold one tile of base-2 scores into the running max / sum; returns (p, alpha, m_new, l_new).

    s: (BLOCK_M, BLOCK_N), masked entries already -inf. A row that has seen no key yet keeps
    m = -inf; its shift is taken as 0 so that exp2(-inf - shift) = 0 instead of NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - shift[:, None])  # (BLOCK_M, BLOCK_N)
    alpha = tl.math.exp2(m_i - shift)  # rescales what was accumulated under the old max
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def finish(acc, m_i, l_i):
    """Normalise the accumulator; a row that saw no key gets out = 0 and lse = -inf (natural log)."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]  # acc is 0 on empty rows
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    return out, lse


def dot_flags(dtype: torch.dtype, device: torch.device) -> dict[str, object]:
    """Constexprs for the two ``tl.dot`` calls of a kernel.

    fp32 inputs use IEEE fp32 products (Triton's default would be TF32 on NVIDIA GPUs, ~1e-3).
    On CPU the kernels run in Triton's interpreter, whose ``tl.dot`` multiplies bf16 operands
    as raw bits (Triton 3.9), so there the operands are upcast to fp32 first: the products of
    bf16 / fp16 numbers are exact in fp32, so the result is what the GPU computes."""
    return {
        "DOT_FP32": device.type == "cpu",
        "PRECISION": "ieee" if dtype == torch.float32 or device.type == "cpu" else "tf32",
    }


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def check_cache(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """Validate query / cache shapes and dtypes; returns (block_size, num_kv_heads, group)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be (num_blocks, block_size, Hkv, D); "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if query.dim() != 3 or query.shape[2] != k_cache.shape[3]:
        raise ValueError(f"query must be (T, Hq, D) with D = {k_cache.shape[3]}; got {tuple(query.shape)}")
    if not (query.dtype == k_cache.dtype == v_cache.dtype) or query.dtype not in CAPABILITIES.dtypes:
        raise ValueError(
            f"query and caches must share one dtype of {CAPABILITIES.dtypes}; "
            f"got {query.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    if not supported_block_size(block_size):
        raise ValueError(f"block size {block_size} is not supported")
    if not supported_head_dim(head_dim):
        raise ValueError(f"head dim {head_dim} is not supported (a multiple of 8 from 16 to 256)")
    group = query.shape[1] // num_kv_heads
    if query.shape[1] % num_kv_heads or group > CAPABILITIES.max_gqa_group:
        raise ValueError(
            f"{query.shape[1]} query heads over {num_kv_heads} kv heads: need a whole number of query "
            f"heads per kv head, at most {CAPABILITIES.max_gqa_group}"
        )
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or query.stride(2) != 1:
        raise ValueError("query and caches must be contiguous in the head dim")
    return block_size, num_kv_heads, group
