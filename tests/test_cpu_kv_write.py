"""The CPU's KV cache store (kernels/cpu/kv_write.py): the same cache as the torch reference's
``index_copy_``, from the strided key and value views the model hands over."""

from __future__ import annotations

import pytest
import torch

from batchrun.kernels import torch_ref
from batchrun.kernels.cpu.kv_write import write_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 37, 600])  # 600: the threaded path
def test_write_kv_matches_index_copy(dtype, tokens):
    gen = torch.Generator().manual_seed(tokens)
    blocks, block_size, heads, dim = 64, 16, 2, 24
    shape = (blocks + 1, block_size, heads, dim)
    k_ref, v_ref = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    k_got, v_got = k_ref.clone(), v_ref.clone()
    # as the model hands them: (1, Hkv, T, D) -> (T, Hkv, D) views, strided over heads, and
    # a float32 value that the store casts to the cache's dtype
    key = torch.randn(1, heads, tokens, dim, generator=gen).to(dtype)[0].transpose(0, 1)
    value = torch.randn(1, tokens, heads, dim, generator=gen)[0]
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    torch_ref.write_kv(key, value, k_ref, v_ref, slots)
    write_kv(key, value, k_got, v_got, slots)
    assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref)


def test_write_kv_refuses_a_slot_outside_the_cache():
    k_cache, v_cache = torch.zeros(3, 4, 1, 8), torch.zeros(3, 4, 1, 8)
    rows = torch.ones(2, 1, 8)
    with pytest.raises(IndexError, match="12 slots"):
        write_kv(rows, rows, k_cache, v_cache, torch.tensor([0, 12]))
    assert not k_cache.any() and not v_cache.any()  # nothing written
