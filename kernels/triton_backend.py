"""The Triton attention backend: every layer is three launches plus the K/V store, whatever
the number of shared-prefix groups (BatchLLM's horizontal fusion).

``build`` (once per step) picks the plan's first-level groups whose members' queries all sit
after the group's shared prefix — decodes *and* prefill chunks — and lays them out for the
kernels (kernels/triton/):

    own      = paged_attention(q, kv_start = prefix_len for grouped sequences)   # one launch
    prefix   = prefix_attention(q[group rows], each group's prefix blocks)       # one launch
    out      = merge_attention_into(own, prefix)                                 # one launch

Every group's prefix keys are read once for all its queries; each sequence reads only its
own keys after the prefix. Layers with a sliding window skip the split (the prefix kernel
knows no query positions) and run the plain paged kernel over the whole context.

On CUDA the kernels are compiled; on CPU they run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported), which is how the tests check them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from batchrun.kernels.backend import AttentionBackend, BackendCapabilities
from batchrun.kernels.metadata import AttentionMetadata
from batchrun.kernels.triton import (
    CAPABILITIES,
    merge_attention_into,
    paged_attention,
    prefix_attention,
    store_kv,
)

# Splitting costs two more launches per layer in all, not per group, so every group of two or
# more members is split. Not yet measured on a GPU (none has been available): the GPU
# benchmark is what should set this.
TRITON_CASCADE_MIN_SAVED_TOKENS = 1


@dataclass(frozen=True)
class CascadeLayout:
    """The step's shared-prefix groups, as the prefix kernel reads them."""

    group_rows: torch.Tensor  # (Tg,) int32: query rows of the groups' members, group by group
    cu_group_rows: torch.Tensor  # (G + 1,) int32
    group_tables: torch.Tensor  # (G, Wp) int32: each group's prefix blocks
    group_prefix_len: torch.Tensor  # (G,) int32: prefix tokens (a multiple of block_size)
    kv_start: torch.Tensor  # (S,) int32: the prefix length for grouped sequences, else 0
    max_group_rows: int


@dataclass(frozen=True)
class TritonStepState:
    slot_mapping: torch.Tensor  # (T,) int64
    cu_seqlens_q: torch.Tensor  # (S + 1,) int32
    seq_lens: torch.Tensor  # (S,) int32
    block_tables: torch.Tensor  # (S, W) int32, null-block padded
    max_q_len: int
    cascade: CascadeLayout | None


def _devices() -> frozenset[str]:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return frozenset({"cuda", "cpu"} if interpreted else {"cuda"})


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, cascade_min_saved_tokens: int = TRITON_CASCADE_MIN_SAVED_TOKENS) -> None:
        self.cascade_min_saved_tokens = cascade_min_saved_tokens
        self.capabilities = BackendCapabilities(
            devices=_devices(),
            dtypes=frozenset(CAPABILITIES.dtypes),
            head_dims=frozenset({16, 32, 64, 128, 256}),
            max_gqa_group=CAPABILITIES.max_gqa_group,
            softcap=CAPABILITIES.paged_softcap,
            sliding_window=CAPABILITIES.paged_sliding_window,
            shared_prefix=True,
        )

    def build(self, meta: AttentionMetadata) -> TritonStepState:
        return TritonStepState(
            slot_mapping=meta.slot_mapping,
            cu_seqlens_q=meta.cu_seqlens_q,
            seq_lens=meta.seq_lens,
            block_tables=meta.block_tables,
            max_q_len=max(meta.q_lens_host),
            cascade=self._cascade(meta),
        )

    def write_kv(self, state, key, value, k_cache, v_cache) -> None:
        store_kv(key, value, k_cache, v_cache, state.slot_mapping)

    def forward(self, state, query, k_cache, v_cache, scale, softcap=None, sliding_window=None):
        cascade = state.cascade
        step = (query, k_cache, v_cache, state.cu_seqlens_q, state.seq_lens, state.block_tables, scale)
        if cascade is None or sliding_window:
            return paged_attention(
                *step, softcap=softcap, sliding_window=sliding_window, max_q_len=state.max_q_len
            )
        # each sequence's own keys (after its group's prefix), then every group's prefix, merged
        out, lse = paged_attention(
            *step, kv_start=cascade.kv_start, return_lse=True, softcap=softcap, max_q_len=state.max_q_len
        )
        prefix = prefix_attention(
            query,
            k_cache,
            v_cache,
            cascade.group_rows,
            cascade.cu_group_rows,
            cascade.group_tables,
            cascade.group_prefix_len,
            scale,
            softcap,
            max_group_rows=cascade.max_group_rows,
        )
        merge_attention_into(out, lse, cascade.group_rows, prefix.out, prefix.lse)
        return out

    def _cascade(self, meta: AttentionMetadata) -> CascadeLayout | None:
        """Groups worth splitting: members whose queries all come after the shared prefix."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (key, prefix_len) in enumerate(
            zip(meta.group_keys_host, meta.group_prefix_lens_host, strict=True)
        ):
            first_query = meta.seq_lens_host[i] - meta.q_lens_host[i]
            if key >= 0 and prefix_len >= meta.block_size and first_query >= prefix_len:
                groups.setdefault((key, prefix_len), []).append(i)
        chosen = [
            (prefix_len, members)
            for (_, prefix_len), members in groups.items()
            if (len(members) - 1) * prefix_len >= self.cascade_min_saved_tokens
        ]
        if not chosen:
            return None
        starts, q_lens = meta.q_starts_host, meta.q_lens_host
        rows, cu, kv_start = [], [0], [0] * len(q_lens)
        for prefix_len, members in chosen:
            for i in members:
                rows.extend(range(starts[i], starts[i] + q_lens[i]))
                kv_start[i] = prefix_len
            cu.append(len(rows))
        width = max(prefix_len for prefix_len, _ in chosen) // meta.block_size
        firsts = [members[0] for _, members in chosen]
        tables = meta.block_tables[firsts, :width]  # members share these columns (their prefix)
        device = meta.block_tables.device

        def int32(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

        return CascadeLayout(
            group_rows=int32(rows),
            cu_group_rows=int32(cu),
            group_tables=tables,
            group_prefix_len=int32([prefix_len for prefix_len, _ in chosen]),
            kv_start=int32(kv_start),
            max_group_rows=max(cu[g + 1] - cu[g] for g in range(len(chosen))),
        )
