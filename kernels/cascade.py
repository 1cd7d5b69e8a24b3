"""Shared-prefix (cascade) decode attention in plain torch: the prefix is read once per group.

For R decoding sequences that share a first-level prefix of Lp tokens (the plan's groups),
attention splits at the prefix boundary (Hydragen / FlashInfer cascade):

* prefix part — every query of the group against the one shared copy of the prefix keys:
  a single ``(Hkv, R·g, D) × (Hkv, D, Lp)`` product instead of R gathers of Lp keys;
* suffix part — each query against its own keys after the prefix, batched and masked;
* merge — by log-sum-exp, in natural log: with ``m = max(s_a, s_b)``,
  ``o = (e^(s_a-m) o_a + e^(s_b-m) o_b) / (e^(s_a-m) + e^(s_b-m))``.

The result equals full attention up to float rounding (tests/test_kernels.py checks it).
"""

from __future__ import annotations

import torch


def partial_attention(
    q: torch.Tensor,  # (Hkv, N, D): N queries per kv head
    k: torch.Tensor,  # (Hkv, L, D) or (Hkv, N, L, D) with a batch of key sets
    v: torch.Tensor,
    scale: float,
    visible: torch.Tensor | None = None,  # bool, broadcastable to the scores
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over one slice of the keys: (output, natural-log LSE per query)."""
    if k.dim() == 3:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (Hkv, N, L)
    else:
        scores = torch.matmul(q.unsqueeze(2), k.transpose(-1, -2)).squeeze(2).float() * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (Hkv, N)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)
    if k.dim() == 3:
        out = torch.matmul(probs, v)  # (Hkv, N, D)
    else:
        out = torch.matmul(probs.unsqueeze(2), v).squeeze(2)
    return out, lse


def merge(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Combine two partial attentions over disjoint key sets (natural-log LSEs)."""
    m = torch.maximum(lse_a, lse_b)
    w_a = torch.exp(lse_a - m).unsqueeze(-1)
    w_b = torch.exp(lse_b - m).unsqueeze(-1)
    return ((w_a * o_a.float() + w_b * o_b.float()) / (w_a + w_b)).to(o_a.dtype)


def cascade_decode(
    q: torch.Tensor,  # (R, Hq, D): one query per sequence of the group
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    tables: torch.Tensor,  # (R, width) block tables; the first prefix_blocks columns are equal
    kv_lens: torch.Tensor,  # (R,) keys per sequence, all > prefix_blocks * block_size
    prefix_blocks: int,
    scale: float,
) -> torch.Tensor:
    """Decode attention for a group sharing its first ``prefix_blocks`` blocks; (R, Hq, D)."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    # (Hkv, R * g, D): the group's queries, kv head major
    qh = (
        q.view(num_seqs, num_kv_heads, group, head_dim)
        .permute(1, 0, 2, 3)
        .reshape(num_kv_heads, -1, head_dim)
    )

    prefix = tables[0, :prefix_blocks]
    k_p = k_cache[prefix].flatten(0, 1).transpose(0, 1)  # (Hkv, Lp, D), read once for the group
    v_p = v_cache[prefix].flatten(0, 1).transpose(0, 1)
    o_a, lse_a = partial_attention(qh, k_p, v_p, scale)

    prefix_len = prefix_blocks * block_size
    width = -(-int(kv_lens.max()) // block_size)
    own = tables[:, prefix_blocks:width]  # (R, Ws)
    k_s = k_cache[own].flatten(1, 2)  # (R, Ls, Hkv, D)
    v_s = v_cache[own].flatten(1, 2)
    pos = torch.arange(k_s.shape[1], device=q.device)[None, :] + prefix_len
    visible = pos < kv_lens[:, None]  # (R, Ls)
    # per query row (Hkv, R * g, Ls, D): each sequence's keys repeated for its g query heads
    k_s = k_s.permute(2, 0, 1, 3).repeat_interleave(group, dim=1)
    v_s = v_s.permute(2, 0, 1, 3).repeat_interleave(group, dim=1)
    visible = visible.repeat_interleave(group, dim=0)[None]  # (1, R * g, Ls)
    o_b, lse_b = partial_attention(qh, k_s, v_s, scale, visible)

    out = merge(o_a, lse_a, o_b, lse_b)  # (Hkv, R * g, D)
    return (
        out.view(num_kv_heads, num_seqs, group, head_dim)
        .permute(1, 0, 2, 3)
        .reshape(num_seqs, num_heads, head_dim)
    )
