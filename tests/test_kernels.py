"""Attention kernels against the dense per-sequence reference."""

from __future__ import annotations

import pytest
import torch

from batchrun.kernels.cascade import cascade_decode, merge, partial_attention
from batchrun.kernels.torch_ref import attend


@pytest.mark.parametrize("num_kv_heads, group", [(1, 1), (2, 4)])
@pytest.mark.parametrize("prefix_blocks", [1, 3])
def test_cascade_decode_equals_full_attention(num_kv_heads, group, prefix_blocks):
    torch.manual_seed(0)
    block_size, head_dim, num_blocks = 4, 8, 32
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    shared = list(range(prefix_blocks))
    own = [[10, 11, 12], [13], [14, 15]]  # each sequence's blocks after the prefix
    kv_lens = [prefix_blocks * block_size + n for n in (9, 2, 5)]
    width = prefix_blocks + 3
    tables = torch.tensor([shared + o + [0] * (width - prefix_blocks - len(o)) for o in own])
    q = torch.randn(3, num_kv_heads * group, head_dim)
    got = cascade_decode(q, k_cache, v_cache, tables, torch.tensor(kv_lens), prefix_blocks, 0.3)
    for i, kv_len in enumerate(kv_lens):
        blocks = tables[i, : -(-kv_len // block_size)]
        k = k_cache[blocks].flatten(0, 1)[:kv_len]
        v = v_cache[blocks].flatten(0, 1)[:kv_len]
        want = attend(q[i : i + 1], k, v, 0.3)[0]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_merging_two_halves_equals_attention_over_both():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    whole, _ = partial_attention(q, k, v, 0.5)
    o_a, lse_a = partial_attention(q, k[:, :7], v[:, :7], 0.5)
    o_b, lse_b = partial_attention(q, k[:, 7:], v[:, 7:], 0.5)
    torch.testing.assert_close(merge(o_a, lse_a, o_b, lse_b), whole, rtol=1e-5, atol=1e-6)
