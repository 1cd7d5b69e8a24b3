"""The KV cache store on the CPU (kv_write.cpp): each new token's key and value rows copied to
their slots, as ``index_copy_`` does, without its stall on every scattered destination."""

from __future__ import annotations

import ctypes
import functools

import torch

from batchrun.kernels.cpu.build import load


@functools.cache
def _entry():
    entry = load().batchrun_write_kv
    entry.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3
    entry.argtypes += [ctypes.c_int64] * 4
    entry.restype = ctypes.c_int
    return entry


def write_kv(
    key: torch.Tensor,  # (T, Hkv, D), any token / head strides, unit stride along D
    value: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (num_blocks + 1, block_size, Hkv, D) contiguous
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # (T,) int64, each slot below num_blocks + 1 times block_size
) -> None:
    """Store the step's new keys and values at their cache slots."""
    key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    slots = slot_mapping.to(torch.int64).contiguous()
    size = key.element_size()
    status = _entry()(
        key.data_ptr(),
        key.stride(0) * size,
        key.stride(1) * size,
        value.data_ptr(),
        value.stride(0) * size,
        value.stride(1) * size,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        k_cache.shape[0] * k_cache.shape[1],
        key.shape[0],
        key.shape[1],
        key.shape[2] * size,
    )
    if status != 0:
        raise IndexError(f"a KV slot outside the cache's {k_cache.shape[0] * k_cache.shape[1]} slots")
