"""Reference paged attention in plain torch: always importable, runs on CPU.

This is the oracle the CPU and Triton backends are tested against, and what ``auto`` falls
back to where their kernels cannot run. ``build`` plans the step once: the plan's decode groups
whose shared prefix is worth reading once (cascade.py), one batched call for the other
decodes, and each prefill chunk's blocks; every layer then gathers its keys through those
index tensors and runs torch's fused scaled-dot-product attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchrun.kernels.backend import AttentionBackend, BackendCapabilities
from batchrun.kernels.cascade import cascade_decode
from batchrun.kernels.metadata import AttentionMetadata

# Use the cascade kernel for a decode group when it spares at least this many prefix-token
# reads ((members - 1) x prefix length); below it the per-group overhead costs more (CPU).
CASCADE_MIN_SAVED_TOKENS = 2048


@dataclass(frozen=True)
class DecodeBatch:
    """Single-token queries of several sequences, attended in one call."""

    rows: torch.Tensor  # (R,) query rows in the packed step
    tables: torch.Tensor  # (R, W) block tables, W = blocks of the longest
    kv_lens: torch.Tensor  # (R,) keys per sequence (the query sits at kv_len - 1)
    positions: torch.Tensor  # (1, W * block_size) key positions


@dataclass(frozen=True)
class CascadeGroup:
    """Decodes of one first-level group: its prefix blocks are read once for all of them."""

    rows: torch.Tensor  # (R,)
    tables: torch.Tensor  # (R, W); the first prefix_blocks columns are equal
    kv_lens: torch.Tensor  # (R,)
    prefix_blocks: int


@dataclass(frozen=True)
class Chunk:
    """A sequence attended on its own: a prefill chunk, or a lone decode."""

    start: int  # first query row
    q_len: int
    blocks: torch.Tensor  # (ceil(kv_len / block_size),) its blocks
    kv_len: int


@dataclass
class TorchStepState:
    slot_mapping: torch.Tensor  # (T,) int64
    cascades: list[CascadeGroup]
    decodes: DecodeBatch | None  # decodes outside the cascade groups
    all_decodes: DecodeBatch | None  # every decode, for layers the cascade path cannot run
    chunks: list[Chunk]  # the other sequences

    def plain(self) -> tuple[DecodeBatch | None, list[Chunk]]:
        """Decodes and chunks for a layer that soft-caps or slides (no cascade there): the
        cascade groups' decodes join the batched ones."""
        if self.all_decodes is None:
            return self.decodes, self.chunks
        return self.all_decodes, [c for c in self.chunks if c.q_len > 1]


class TorchBackend(AttentionBackend):
    name = "torch"
    capabilities = BackendCapabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        shared_prefix=True,
        in_place=False,  # gathers each sequence's blocks into a dense copy
    )

    def __init__(self, cascade_min_saved_tokens: int = CASCADE_MIN_SAVED_TOKENS) -> None:
        self.cascade_min_saved_tokens = cascade_min_saved_tokens

    def build(self, meta: AttentionMetadata) -> TorchStepState:
        device = meta.block_tables.device
        groups = self._cascade_groups(meta)
        in_cascade = {i for members in groups.values() for i in members}
        decodes = [i for i, q in enumerate(meta.q_lens_host) if q == 1]
        rest = [i for i in decodes if i not in in_cascade]
        batched = set(rest) if len(rest) > 1 else set()
        return TorchStepState(
            slot_mapping=meta.slot_mapping,
            cascades=[
                self._cascade(meta, members, prefix_len, device)
                for (_, prefix_len), members in groups.items()
            ],
            decodes=_decode_batch(meta, rest, device) if batched else None,
            all_decodes=_decode_batch(meta, decodes, device) if in_cascade else None,
            chunks=[_chunk(meta, i) for i in range(len(meta.q_lens_host)) if i not in in_cascade | batched],
        )

    def write_kv(self, state, key, value, k_cache, v_cache) -> None:
        write_kv(key, value, k_cache, v_cache, state.slot_mapping)

    def forward(self, state, query, k_cache, v_cache, scale, softcap=None, sliding_window=None):
        out = torch.empty_like(query)
        if softcap or sliding_window:  # the cascade path does neither
            decodes, chunks = state.plain()
        else:
            decodes, chunks = state.decodes, state.chunks
            for g in state.cascades:
                out[g.rows] = cascade_decode(
                    query[g.rows], k_cache, v_cache, g.tables, g.kv_lens, g.prefix_blocks, scale
                )
        if decodes is not None:
            out[decodes.rows] = _attend_decodes(
                query[decodes.rows], k_cache, v_cache, decodes, scale, softcap, sliding_window
            )
        for c in chunks:
            k = k_cache[c.blocks].flatten(0, 1)[: c.kv_len]  # (L, Hkv, D)
            v = v_cache[c.blocks].flatten(0, 1)[: c.kv_len]
            q = query[c.start : c.start + c.q_len]  # (Q, Hq, D)
            out[c.start : c.start + c.q_len] = attend(q, k, v, scale, softcap, sliding_window)
        return out

    def _cascade_groups(self, meta: AttentionMetadata) -> dict[tuple[int, int], list[int]]:
        """Decoding sequences grouped by the prefix they share, where reading it once pays
        (a call per group has a fixed cost; small groups go through the batched path)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (q_len, key, prefix_len) in enumerate(
            zip(meta.q_lens_host, meta.group_keys_host, meta.group_prefix_lens_host, strict=True)
        ):
            if q_len == 1 and key >= 0 and prefix_len >= meta.block_size:
                groups.setdefault((key, prefix_len), []).append(i)
        return {
            g: members
            for g, members in groups.items()
            if (len(members) - 1) * g[1] >= self.cascade_min_saved_tokens
        }

    @staticmethod
    def _cascade(meta, members, prefix_len, device) -> CascadeGroup:
        batch = _decode_batch(meta, members, device)
        return CascadeGroup(batch.rows, batch.tables, batch.kv_lens, prefix_len // meta.block_size)


def _decode_batch(meta: AttentionMetadata, seqs: list[int], device) -> DecodeBatch:
    kv_lens = [meta.seq_lens_host[i] for i in seqs]
    width = -(-max(kv_lens) // meta.block_size)
    return DecodeBatch(
        rows=torch.tensor([meta.q_starts_host[i] for i in seqs], device=device),
        tables=meta.block_tables[seqs, :width],
        kv_lens=torch.tensor(kv_lens, device=device),
        positions=torch.arange(width * meta.block_size, device=device)[None, :],
    )


def _chunk(meta: AttentionMetadata, i: int) -> Chunk:
    kv_len = meta.seq_lens_host[i]
    return Chunk(
        meta.q_starts_host[i],
        meta.q_lens_host[i],
        meta.block_tables[i, : -(-kv_len // meta.block_size)],
        kv_len,
    )


def write_kv(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (num_blocks + 1, block_size, Hkv, D)
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # (T,) int64
) -> None:
    """Store the step's new keys and values at their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _attend_decodes(
    q: torch.Tensor,  # (R, Hq, D): one query per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: DecodeBatch,
    scale: float,
    softcap: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """One query per sequence over its paged keys, all sequences at once; (R, Hq, D)."""
    k = k_cache[batch.tables].flatten(1, 2)  # (R, L, Hkv, D), L = W * block_size
    v = v_cache[batch.tables].flatten(1, 2)
    kv_lens = batch.kv_lens[:, None]
    visible = batch.positions < kv_lens  # (R, L); the query sits at position kv_len - 1
    if sliding_window:
        visible &= batch.positions > kv_lens - 1 - sliding_window
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
