"""The Triton attention backend: every layer is three launches plus the K/V store, whatever
the number of shared-prefix groups (BatchLLM's horizontal fusion).

``build`` (once per step) picks the plan's first-level groups whose members' queries all sit
after the group's shared prefix — decodes *and* prefill chunks — and lays them out for the
kernels (kernels/triton/):

    own      = paged_attention(q, kv_start = prefix_len for grouped sequences)   # one launch
    prefix   = prefix_attention(q[group rows], each group's prefix blocks)       # one launch
    out      = merge_attention_into(own, prefix)                                 # one launch

Every group's prefix keys are read once for all its queries; each sequence reads only its
own keys after the prefix. A launch that would leave a GPU underfilled (a few long decodes,
a few groups with long prefixes) walks its keys in several programs and adds one reduce
launch (split-KV, kernels/triton/split_kv.py); ``build`` hands the kernels the longest key
runs from host copies, so choosing costs no device sync. Layers with a sliding window skip
the cascade (the prefix kernel knows no query positions) and run the plain paged kernel over
the whole context.

For a step that runs in a CUDA graph (``meta.static_shapes``, core/runner/cuda_graphs.py) the
host values the launches bake in are rounded so that many steps share one graph: the tile
hints to powers of two, the longest key runs to ``split_hint`` (which keeps every split
choice); the group layout is padded by ``cascade_layout``; ``graph_inputs`` names them all.

On CUDA the kernels are compiled; on CPU they run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported), which is how the tests check them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from batchrun.kernels.backend import AttentionBackend, BackendCapabilities, GraphInputs
from batchrun.kernels.cascade_layout import CascadeLayout, cascade_layout
from batchrun.kernels.metadata import AttentionMetadata
from batchrun.kernels.triton import (
    CAPABILITIES,
    merge_attention_into,
    paged_attention,
    prefix_attention,
    store_kv,
    supported_head_dim,
)
from batchrun.kernels.triton._common import next_power_of_2
from batchrun.kernels.triton.split_kv import split_hint

# Splitting costs two more launches per layer in all, not per group, so every group of two or
# more members is split. Not yet measured on a GPU (none has been available): the GPU
# benchmark is what should set this.
TRITON_CASCADE_MIN_SAVED_TOKENS = 1


@dataclass(frozen=True)
class TritonStepState:
    slot_mapping: torch.Tensor  # (T,) int64
    cu_seqlens_q: torch.Tensor  # (S + 1,) int32
    seq_lens: torch.Tensor  # (S,) int32
    block_tables: torch.Tensor  # (S, W) int32, null-block padded
    max_q_len: int
    max_kv_len: int  # most keys one sequence reads in the plain kernel
    max_own_kv_len: int  # ... and after its group's prefix, when the cascade splits
    max_prefix_len: int  # longest split-off prefix (0 without a cascade)
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
            head_dims=frozenset(d for d in range(16, 257) if supported_head_dim(d)),
            max_gqa_group=CAPABILITIES.max_gqa_group,
            softcap=CAPABILITIES.paged_softcap,
            sliding_window=CAPABILITIES.paged_sliding_window,
            shared_prefix=True,
            cuda_graphs=True,
        )

    def build(self, meta: AttentionMetadata) -> TritonStepState:
        cascade = cascade_layout(meta, self.cascade_min_saved_tokens)
        max_kv_len = max(meta.seq_lens_host)
        max_own_kv_len, max_prefix_len = max_kv_len, 0
        if cascade is not None:
            own = zip(meta.seq_lens_host, cascade.kv_start_host, strict=True)
            max_own_kv_len = max(seq_len - start for seq_len, start in own)
            max_prefix_len = max(cascade.group_prefix_len_host)
        max_q_len = max(meta.q_lens_host)
        if meta.static_shapes:  # hints coarse enough for graphs to share, launching alike
            max_q_len = next_power_of_2(max_q_len)
            max_kv_len, max_own_kv_len = split_hint(max_kv_len), split_hint(max_own_kv_len)
            max_prefix_len = split_hint(max_prefix_len)
        return TritonStepState(
            slot_mapping=meta.slot_mapping,
            cu_seqlens_q=meta.cu_seqlens_q,
            seq_lens=meta.seq_lens,
            block_tables=meta.block_tables,
            max_q_len=max_q_len,
            max_kv_len=max_kv_len,
            max_own_kv_len=max_own_kv_len,
            max_prefix_len=max_prefix_len,
            cascade=cascade,
        )

    def graph_inputs(self, state: TritonStepState) -> GraphInputs:
        tensors = (state.slot_mapping, state.cu_seqlens_q, state.seq_lens, state.block_tables)
        hints = (state.max_q_len, state.max_kv_len, state.max_own_kv_len, state.max_prefix_len)
        cascade = state.cascade
        if cascade is None:
            return GraphInputs((*hints, None), tensors)
        layout = (cascade.group_rows, cascade.cu_group_rows, cascade.group_tables, cascade.group_prefix_len)
        return GraphInputs((*hints, cascade.max_group_rows), (*tensors, *layout, cascade.kv_start))

    def write_kv(self, state, key, value, k_cache, v_cache) -> None:
        store_kv(key, value, k_cache, v_cache, state.slot_mapping)

    def forward(self, state, query, k_cache, v_cache, scale, softcap=None, sliding_window=None):
        cascade = state.cascade
        step = (query, k_cache, v_cache, state.cu_seqlens_q, state.seq_lens, state.block_tables, scale)
        hints = {"max_q_len": state.max_q_len}
        if cascade is None or sliding_window:
            return paged_attention(
                *step, softcap=softcap, sliding_window=sliding_window, max_kv_len=state.max_kv_len, **hints
            )
        # each sequence's own keys (after its group's prefix), then every group's prefix, merged
        out, lse = paged_attention(
            *step,
            kv_start=cascade.kv_start,
            return_lse=True,
            softcap=softcap,
            max_kv_len=state.max_own_kv_len,
            **hints,
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
            max_prefix_len=state.max_prefix_len,
        )
        merge_attention_into(out, lse, cascade.group_rows, prefix.out, prefix.lse)
        return out
