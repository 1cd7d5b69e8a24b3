"""Split-KV (flash decoding): one query tile's keys walked by several programs, then reduced.

A step of a few long decodes gives the attention kernels few programs — (query tiles) x (kv
heads) — on a GPU with over a hundred multiprocessors, and each walks thousands of keys
alone. Split-KV cuts each tile's key range into ``num_splits`` contiguous runs of whole key
tiles; split ``s`` of a program covers::

    tiles = ceil((hi - start) / BLOCK_N)           start = lo rounded down to a key tile
    per_split = ceil(tiles / num_splits)
    keys [start + s * per_split * BLOCK_N, min(hi, start + (s + 1) * per_split * BLOCK_N))

and writes a partial attention (out fp32, natural-log lse) to scratch buffers
``(num_splits, rows, Hq, D)`` / ``(num_splits, rows, Hq)``. A second launch folds the
splits of every (row, head) together by log-sum-exp, in split order::

    m = max_s lse_s,   w_s = e^(lse_s - m),   out = sum_s w_s out_s / sum_s w_s,   lse = m + log(sum_s w_s)

A split with no keys (lse = -inf) has weight exactly 0; a row whose splits are all empty
gets out = 0, lse = -inf, as without splitting. The partial outputs stay fp32, so the only
change to results is the order of floating-point sums (one rounding of the final output).

How many splits: ``choose_num_splits`` — enough programs to fill the GPU twice over, never
fewer than ``MIN_KEYS_PER_SPLIT`` keys per split, at most ``MAX_SPLITS``; 1 on CPU (the
interpreter gains nothing) unless a caller asks. The figures are first guesses: no GPU has
been available to this project to tune them on (the GPU benchmark is where they get set).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from batchrun.kernels.triton._common import next_power_of_2

MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16
PROGRAMS_PER_MULTIPROCESSOR = 2


@triton.jit
def split_key_range(start, hi, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys ``[lo_s, hi_s)`` of split ``split`` of the run ``[start, hi)`` (start aligned to
    BLOCK_N): whole key tiles, so every split's loop is the unsplit loop over fewer tiles."""
    lo_s = start
    hi_s = hi
    if NUM_SPLITS > 1:
        tiles = tl.maximum(tl.cdiv(hi - start, BLOCK_N), 0)
        span = tl.cdiv(tiles, NUM_SPLITS) * BLOCK_N
        lo_s = start + split * span
        hi_s = tl.minimum(hi, lo_s + span)
    return lo_s, hi_s


@triton.jit
def _reduce_splits_kernel(
    PartOut, PartLse, Out, Lse,  # (NS, R, H, D) fp32, (NS, R, H) fp32; (R, H, D), (R, H)
    num_rows, num_heads,
    stride_ps, stride_pt, stride_ph, stride_pls, stride_plt, stride_plh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # HEAD_DIM rounded up to a power of two, columns masked
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_H: tl.constexpr,  # heads, padded to a power of two
    WRITE_LSE: tl.constexpr,
):  # fmt: skip
    # BLOCK_R rows x BLOCK_H heads per program, flattened: element e = (row e // BLOCK_H, head e % BLOCK_H)
    offs = tl.arange(0, BLOCK_R * BLOCK_H)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + offs // BLOCK_H  # (BLOCK_R * BLOCK_H,)
    h = offs % BLOCK_H
    ok = (r < num_rows) & (h < num_heads)
    offs_d = tl.arange(0, HEAD_DIM_P)
    ok_d = ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    m = tl.full([BLOCK_R * BLOCK_H], float("-inf"), dtype=tl.float32)  # running max of lse
    total = tl.zeros([BLOCK_R * BLOCK_H], dtype=tl.float32)  # sum of e^(lse_s - m)
    acc = tl.zeros([BLOCK_R * BLOCK_H, HEAD_DIM_P], dtype=tl.float32)  # sum of e^(lse_s - m) out_s
    for s in tl.static_range(NUM_SPLITS):
        lse_s = tl.load(
            PartLse + s * stride_pls + r * stride_plt + h * stride_plh, mask=ok, other=float("-inf")
        )
        o_s = tl.load(
            PartOut + s * stride_ps + r[:, None] * stride_pt + h[:, None] * stride_ph + offs_d[None, :],
            mask=ok_d,
            other=0.0,
        )
        m_new = tl.maximum(m, lse_s)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)  # 0 while nothing has been seen (m = -inf)
        w = tl.exp(lse_s - shift)  # exactly 0 for an empty split
        acc = acc * alpha[:, None] + w[:, None] * o_s
        total = total * alpha + w
        m = m_new

    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]  # acc is 0 where nothing was seen
    tl.store(
        Out + r[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=ok_d,
    )
    if WRITE_LSE:
        lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        tl.store(Lse + r * stride_lt + h * stride_lh, lse, mask=ok)


def plan_splits(
    num_splits: int | None, programs: int, longest_keys: int | None, out: torch.Tensor, lse: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A launch's splits (``num_splits``, or ``choose_num_splits`` when None) and where its
    programs write: ``out`` / ``lse`` themselves without splits, else fp32 split buffers
    shaped after them."""
    if num_splits is None:
        num_splits = choose_num_splits(programs, longest_keys, out.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_splits == 1:
        return 1, out, lse
    part_out = torch.empty((num_splits, *out.shape), dtype=torch.float32, device=out.device)  # (NS, R, H, D)
    part_lse = torch.empty((num_splits, *lse.shape), dtype=torch.float32, device=out.device)  # (NS, R, H)
    return num_splits, part_out, part_lse


def split_strides(buffer: torch.Tensor, num_splits: int) -> tuple[int, int, int]:
    """(split, row, head) strides of an output or LSE buffer: a split buffer's own, or 0 for
    the split of an unsplit one (program_id(2) is then always 0)."""
    if num_splits > 1:
        return tuple(buffer.stride()[:3])
    return (0, *buffer.stride()[:2])


def reduce_splits(
    part_out: torch.Tensor,  # (NS, R, H, D) fp32
    part_lse: torch.Tensor,  # (NS, R, H) fp32, natural log
    out: torch.Tensor,  # (R, H, D): written
    lse: torch.Tensor | None,  # (R, H) fp32: written when given
) -> None:
    """Fold every row's splits into ``out`` (and ``lse``), one launch."""
    num_splits, num_rows, num_heads, head_dim = part_out.shape
    if num_rows == 0:
        return
    block_h = next_power_of_2(num_heads)
    block_r = max(1, 64 // block_h)
    _reduce_splits_kernel[(triton.cdiv(num_rows, block_r),)](
        part_out, part_lse, out, lse if lse is not None else part_lse,
        num_rows, num_heads,
        *part_out.stride()[:3], *part_lse.stride(),
        *out.stride()[:2], *(lse.stride() if lse is not None else (0, 0)),
        NUM_SPLITS=num_splits, HEAD_DIM=head_dim, HEAD_DIM_P=next_power_of_2(head_dim),
        BLOCK_R=block_r, BLOCK_H=block_h,
        WRITE_LSE=lse is not None,
    )  # fmt: skip


def multiprocessor_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)


@functools.cache
def _multiprocessors(index: int) -> int:  # asked once per device, not once per launch
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(programs: int, longest_keys: int | None, device: torch.device) -> int:
    """Splits per program for a launch of ``programs`` programs whose longest key run is
    ``longest_keys`` (a host-side hint; None: unknown, so no split). A power of two.

    1 unless the launch would leave the GPU underfilled: then enough splits to give it
    ``PROGRAMS_PER_MULTIPROCESSOR`` programs per multiprocessor, keeping at least
    ``MIN_KEYS_PER_SPLIT`` keys in each split, at most ``MAX_SPLITS``."""
    if device.type != "cuda" or not longest_keys or programs <= 0:
        return 1
    return splits_for(programs, longest_keys, PROGRAMS_PER_MULTIPROCESSOR * multiprocessor_count(device))


def splits_for(programs: int, longest_keys: int, target_programs: int) -> int:
    """The arithmetic of ``choose_num_splits``, apart from the device (tested on its own)."""
    if programs >= target_programs:
        return 1
    wanted = -(-target_programs // programs)
    most = min(MAX_SPLITS, longest_keys // MIN_KEYS_PER_SPLIT, wanted)
    if most < 2:
        return 1
    return 1 << (most.bit_length() - 1)  # the largest power of two <= most


def split_hint(longest_keys: int) -> int:
    """The smallest key count for which ``choose_num_splits`` answers as for ``longest_keys``,
    whatever the launch: ``min(longest_keys // MIN_KEYS_PER_SPLIT, MAX_SPLITS)`` rounded down
    to a power of two, in keys (0 where no split is possible). A CUDA graph keyed on it
    replays every step whose launches would split alike, without changing any choice."""
    whole = min(longest_keys // MIN_KEYS_PER_SPLIT, MAX_SPLITS)
    if whole < 2:
        return 0
    return (1 << (whole.bit_length() - 1)) * MIN_KEYS_PER_SPLIT
