"""Paged attention on the CPU, reading the KV cache in place (paged_attention.cpp).

``paged_attention`` attends *items*: sets of query rows that read keys through one block
table (a sequence's own rows, causally; or a prefix group's rows against the group's
prefix). It can write a float32 partial result with its log-sum-exp and start from one, so
a group's prefix part and each member's own part combine exactly (see the .cpp file).
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import torch

from batchrun.kernels.cpu.build import DTYPE_CODES, KernelUnavailable, load

__all__ = ["KernelUnavailable", "KeyItems", "Partial", "amx_available", "kernel", "paged_attention"]


class _Args(ctypes.Structure):
    """Mirror of ``PagedAttentionArgs`` in paged_attention.cpp, field for field."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("out_lse", ctypes.c_void_p),
        ("prior_out", ctypes.c_void_p),
        ("prior_lse", ctypes.c_void_p),
        ("rows", ctypes.c_void_p),
        ("cu_rows", ctypes.c_void_p),
        ("tables", ctypes.c_void_p),
        ("key_begin", ctypes.c_void_p),
        ("key_end", ctypes.c_void_p),
        ("table_stride", ctypes.c_int64),
        ("num_items", ctypes.c_int32),
        ("num_q_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("out_f32", ctypes.c_int32),
        ("causal", ctypes.c_int32),
        ("sliding_window", ctypes.c_int32),
        ("use_amx", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
    ]


@functools.cache
def kernel():
    """The kernel's entry point; raises ``KernelUnavailable`` (with why) if it cannot build."""
    library = load()
    size = library.batchrun_paged_attention_args_size
    size.restype = ctypes.c_int64
    if size() != ctypes.sizeof(_Args):
        raise KernelUnavailable(f"argument layout mismatch ({size()} != {ctypes.sizeof(_Args)} bytes)")
    entry = library.batchrun_paged_attention
    entry.argtypes = [ctypes.POINTER(_Args)]
    entry.restype = ctypes.c_int
    return entry


def amx_available() -> bool:
    """Whether bf16 attention runs on AMX tiles here: the kernel was built for a CPU that has
    them and the OS granted them to this process. ``BATCHRUN_CPU_AMX=0`` turns them off (the
    AVX-512 BF16 micro-kernels then run)."""
    if os.environ.get("BATCHRUN_CPU_AMX", "1") == "0":
        return False
    return bool(load().batchrun_amx_available())


@dataclass(frozen=True)
class KeyItems:
    """Which keys each set of query rows reads. All int32, contiguous, on the CPU.

    Item ``i`` owns query rows ``rows[cu_rows[i]:cu_rows[i+1]]`` (or those row numbers
    themselves when ``rows`` is None) and reads key positions ``key_begin[i] ..
    key_end[i] - 1`` through ``tables[i]``. Causal items' rows are consecutive positions
    ending at ``key_end[i] - 1``; the others see every key of the range."""

    cu_rows: torch.Tensor  # (I + 1,)
    tables: torch.Tensor  # (I, W) block ids
    key_begin: torch.Tensor  # (I,)
    key_end: torch.Tensor  # (I,)
    causal: bool
    rows: torch.Tensor | None = None  # (R,)


@dataclass(frozen=True)
class Partial:
    """Attention over part of the keys, to be merged with the rest: float32 outputs and
    natural-log LSEs; rows with LSE -inf have no part here."""

    out: torch.Tensor  # (T, Hq, D) float32
    lse: torch.Tensor  # (T, Hq) float32


def paged_attention(
    query: torch.Tensor,  # (T, Hq, D) contiguous
    k_cache: torch.Tensor,  # (num_blocks + 1, block_size, Hkv, D) contiguous
    v_cache: torch.Tensor,
    items: KeyItems,
    scale: float,
    out: torch.Tensor,  # (T, Hq, D): query's dtype, or float32 for a partial
    out_lse: torch.Tensor | None = None,  # (T, Hq) float32
    prior: Partial | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    use_amx: bool | None = None,  # None: where available (amx_available)
) -> torch.Tensor:
    """Attention of the items' query rows over their paged keys, written into ``out``
    (rows of no item are left untouched); merged with ``prior`` where it has a part."""
    if query.dtype not in DTYPE_CODES or k_cache.dtype != query.dtype:
        raise ValueError(f"unsupported dtypes: query {query.dtype}, cache {k_cache.dtype}")
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if out.dtype not in (query.dtype, torch.float32):
        raise ValueError(f"out must be {query.dtype} or float32, not {out.dtype}")
    for name, t in vars(items).items():
        if isinstance(t, torch.Tensor) and (t.dtype != torch.int32 or t.stride(-1) != 1 or t.is_cuda):
            raise ValueError(f"items.{name} must be int32 on the CPU, contiguous along its last dim")
    args = _Args(
        q=query.data_ptr(),
        k_cache=k_cache.data_ptr(),
        v_cache=v_cache.data_ptr(),
        out=out.data_ptr(),
        out_lse=out_lse.data_ptr() if out_lse is not None else None,
        prior_out=prior.out.data_ptr() if prior is not None else None,
        prior_lse=prior.lse.data_ptr() if prior is not None else None,
        rows=items.rows.data_ptr() if items.rows is not None else None,
        cu_rows=items.cu_rows.data_ptr(),
        tables=items.tables.data_ptr(),
        key_begin=items.key_begin.data_ptr(),
        key_end=items.key_end.data_ptr(),
        table_stride=items.tables.stride(0),
        num_items=items.cu_rows.numel() - 1,
        num_q_heads=query.shape[1],
        num_kv_heads=k_cache.shape[2],
        head_dim=query.shape[2],
        block_size=k_cache.shape[1],
        dtype=DTYPE_CODES[query.dtype],
        out_f32=int(out.dtype == torch.float32),
        causal=int(items.causal),
        sliding_window=sliding_window or 0,
        use_amx=int(use_amx if use_amx is not None else amx_available()),
        scale=scale,
        softcap=softcap or 0.0,
    )
    if kernel()(ctypes.byref(args)) != 0:
        raise RuntimeError("CPU paged attention rejected its arguments")
    return out
