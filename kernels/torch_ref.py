"""Reference paged attention in plain torch: always importable, runs on CPU.

This is the oracle the Triton and flash-attn backends are tested against, and the backend
batchrun uses on CPU: gather each sequence's blocks, then torch's fused scaled-dot-product
attention (all decodes of a step in one call, prefill chunks one sequence at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchrun.kernels.cascade import cascade_decode
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
    """Causal attention of each sequence's new queries over its cached keys; (T, Hq, D).

    Decodes of a first-level group read their shared prefix once (cascade.py); other
    single-token queries are gathered and attended in one batched call; longer chunks
    (prefills) one sequence at a time."""
    out = torch.empty_like(query)
    block_size = k_cache.shape[1]
    starts = meta.q_starts_host
    done: set[int] = set()
    if not softcap and not sliding_window:  # the cascade path does neither
        for members, prefix_blocks in meta.decode_groups:
            rows = torch.tensor([starts[i] for i in members], device=query.device)
            kv_lens = torch.tensor([meta.seq_lens_host[i] for i in members], device=query.device)
            tables = meta.block_tables[list(members)]
            out[rows] = cascade_decode(query[rows], k_cache, v_cache, tables, kv_lens, prefix_blocks, scale)
            done.update(members)
    decodes = [i for i, q_len in enumerate(meta.q_lens_host) if q_len == 1 and i not in done]
    if len(decodes) > 1:
        rows = torch.tensor([starts[i] for i in decodes], device=query.device)
        out[rows] = _decode_batch(
            query[rows], k_cache, v_cache, meta, decodes, scale, softcap, sliding_window
        )
        done.update(decodes)
    for i, (q_len, kv_len) in enumerate(zip(meta.q_lens_host, meta.seq_lens_host, strict=True)):
        if i in done:
            continue
        blocks = meta.block_tables[i, : -(-kv_len // block_size)]
        k = k_cache[blocks].flatten(0, 1)[:kv_len]  # (L, Hkv, D)
        v = v_cache[blocks].flatten(0, 1)[:kv_len]
        q = query[starts[i] : starts[i] + q_len]  # (Q, Hq, D)
        out[starts[i] : starts[i] + q_len] = attend(q, k, v, scale, softcap, sliding_window)
    return out


def _decode_batch(
    q: torch.Tensor,  # (R, Hq, D): one query per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    seqs: list[int],  # which sequences of the step
    scale: float,
    softcap: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """One query per sequence over its paged keys, all sequences at once; (R, Hq, D)."""
    block_size = k_cache.shape[1]
    kv_lens = torch.tensor([meta.seq_lens_host[i] for i in seqs], device=q.device)  # (R,)
    width = -(-int(kv_lens.max()) // block_size)
    tables = meta.block_tables[seqs, :width]  # (R, width)
    k = k_cache[tables].flatten(1, 2)  # (R, L, Hkv, D), L = width * block_size
    v = v_cache[tables].flatten(1, 2)
    pos = torch.arange(k.shape[1], device=q.device)[None, :]  # (1, L)
    visible = pos < kv_lens[:, None]  # (R, L); the query sits at position kv_len - 1
    if sliding_window:
        visible &= pos > kv_lens[:, None] - 1 - sliding_window
    out = _attention(
        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), visible[:, None, None], scale, softcap
    )
    return out[:, :, 0]  # (R, Hq, D)


def attend(
    q: torch.Tensor,  # (Q, Hq, D): the last Q positions of the sequence
    k: torch.Tensor,  # (L, Hkv, D): all L positions, L >= Q
    v: torch.Tensor,  # (L, Hkv, D)
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Dense causal attention for one sequence with grouped-query heads; (Q, Hq, D)."""
    q_len, kv_len = q.shape[0], k.shape[0]
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
    k_pos = torch.arange(kv_len, device=q.device)[None, :]
    visible = k_pos <= q_pos  # (Q, L)
    if sliding_window:
        visible &= k_pos > q_pos - sliding_window
    out = _attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], visible, scale, softcap
    )
    return out[0].transpose(0, 1)  # (Q, Hq, D)


def _attention(
    q: torch.Tensor,  # (B, Hq, Q, D)
    k: torch.Tensor,  # (B, Hkv, L, D)
    v: torch.Tensor,  # (B, Hkv, L, D)
    visible: torch.Tensor,  # bool, broadcastable to (B, Hq, Q, L)
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Masked grouped-query attention; (B, Hq, Q, D). torch's fused SDPA unless soft-capping
    (Gemma 2), which SDPA cannot express."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
