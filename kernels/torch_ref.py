"""Reference paged attention in plain torch: always importable, runs on CPU.

This is the oracle the Triton and flash-attn backends are tested against, and the backend
batchrun uses on CPU. It favours clarity over speed: one small attention per sequence.
"""

from __future__ import annotations

import torch

from batchrun.kernels.metadata import AttentionMetadata


def write_kv(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64
) -> None:
    """Store the step's new keys and values at their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def paged_attention(
    query: torch.Tensor,  # (T, Hq, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    meta: AttentionMetadata,
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys; (T, Hq, D)."""
    out = torch.empty_like(query)
    block_size = k_cache.shape[1]
    q_start = 0
    for i, (q_len, kv_len) in enumerate(zip(meta.q_lens_host, meta.seq_lens_host, strict=True)):
        blocks = meta.block_tables[i, : -(-kv_len // block_size)]
        k = k_cache[blocks].flatten(0, 1)[:kv_len]  # (L, Hkv, D)
        v = v_cache[blocks].flatten(0, 1)[:kv_len]
        q = query[q_start : q_start + q_len]  # (Q, Hq, D)
        out[q_start : q_start + q_len] = attend(q, k, v, scale, softcap, sliding_window)
        q_start += q_len
    return out


def attend(
    q: torch.Tensor,  # (Q, Hq, D): the last Q positions of the sequence
    k: torch.Tensor,  # (L, Hkv, D): all L positions, L >= Q
    v: torch.Tensor,  # (L, Hkv, D)
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Dense causal attention for one sequence with grouped-query heads; (Q, Hq, D)."""
    q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qh = q.reshape(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # (Hkv, g, Q, D)
    kh = k.permute(1, 0, 2).unsqueeze(1)  # (Hkv, 1, L, D)
    vh = v.permute(1, 0, 2).unsqueeze(1)  # (Hkv, 1, L, D)
    scores = torch.matmul(qh, kh.transpose(-1, -2)).float() * scale  # (Hkv, g, Q, L)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
    k_pos = torch.arange(kv_len, device=q.device)[None, :]
    masked = k_pos > q_pos
    if sliding_window:
        masked |= k_pos <= q_pos - sliding_window
    scores.masked_fill_(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, vh)  # (Hkv, g, Q, D)
    return out.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)
