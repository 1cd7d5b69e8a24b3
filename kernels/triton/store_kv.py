"""Write a step's new keys and values into the paged KV cache, one (token, kv head) per program.

Token t goes to flat slot ``slot_mapping[t] = block * block_size + offset``, i.e. to
``k_cache[block, offset]``; a negative slot (a padding token) is skipped. Strided caches
(e.g. views of one combined K/V tensor) are fine; values are cast to the cache dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchrun.kernels.triton._common import next_power_of_2


@triton.jit
def _store_kv_kernel(
    Key, Value, KCache, VCache, slot_mapping,  # (T, Hkv, D) x2, (num_blocks, block_size, Hkv, D) x2, (T,)
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_db, stride_ds, stride_dh,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # HEAD_DIM rounded up to a power of two, columns masked
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_d = tl.arange(0, HEAD_DIM_P)  # one head's vector: (HEAD_DIM_P,)
    d_ok = offs_d < HEAD_DIM
    k = tl.load(Key + t * stride_kt + h * stride_kh + offs_d, mask=d_ok)
    v = tl.load(Value + t * stride_vt + h * stride_vh + offs_d, mask=d_ok)
    tl.store(
        KCache + block * stride_cb + offset * stride_cs + h * stride_ch + offs_d,
        k.to(KCache.dtype.element_ty),
        mask=d_ok,
    )
    tl.store(
        VCache + block * stride_db + offset * stride_ds + h * stride_dh + offs_d,
        v.to(VCache.dtype.element_ty),
        mask=d_ok,
    )


def store_kv(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64; < 0 = skip
) -> None:
    """Store the step's new keys and values at their cache slots (in place)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or k_cache.shape != v_cache.shape or k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit caches "
            f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be ({num_tokens},); got {tuple(slot_mapping.shape)}")
    if key.stride(2) != 1 or value.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("keys, values and caches must be contiguous in the head dim")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride()[:2], *value.stride()[:2],
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, HEAD_DIM_P=next_power_of_2(head_dim),
    )  # fmt: skip
