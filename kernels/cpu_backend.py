"""The CPU attention backend: paged attention that reads the KV cache in place, every shared
prefix read once per group, two kernel calls per layer whatever the number of groups.

``build`` (once per step) splits the plan's first-level groups at their prefix where every
member's queries sit after it (kernels/cascade_layout.py) — decodes *and* prefill chunks —
and lays the step out as kernel items (kernels/cpu/):

    prefix = paged_attention(every group's rows, against the group's prefix blocks)  # float32 + LSE
    out    = paged_attention(each sequence's own rows, keys from kv_start, merged with prefix)

Without a split group (or in a sliding-window layer, where the prefix part would need each
query's position) one call attends every sequence over its whole context. The kernel is
compiled for this CPU on first use (kernels/cpu/build.py); where it cannot be, ``auto``
runs the torch reference and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchrun.kernels.backend import AttentionBackend, BackendCapabilities
from batchrun.kernels.cascade_layout import cascade_layout
from batchrun.kernels.cpu import KeyItems, Partial, kernel, paged_attention
from batchrun.kernels.metadata import AttentionMetadata
from batchrun.kernels.torch_ref import write_kv

# Splitting costs no extra call (the prefix pass runs for all groups at once), and it spares
# (members - 1) reads of the prefix, so every group of two or more members is split.
CPU_CASCADE_MIN_SAVED_TOKENS = 1


@dataclass(frozen=True)
class CpuStepState:
    slot_mapping: torch.Tensor  # (T,) int64
    whole: KeyItems  # every sequence over its whole context
    own: KeyItems | None  # every sequence after its group's prefix (None: no split group)
    prefixes: KeyItems | None  # every split group's rows against its prefix


class CpuBackend(AttentionBackend):
    name = "cpu"
    capabilities = BackendCapabilities(
        devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        shared_prefix=True,
    )

    def __init__(self, cascade_min_saved_tokens: int = CPU_CASCADE_MIN_SAVED_TOKENS) -> None:
        kernel()  # builds or loads the kernel now; KernelUnavailable says why it cannot
        self.cascade_min_saved_tokens = cascade_min_saved_tokens

    def build(self, meta: AttentionMetadata) -> CpuStepState:
        num_seqs = len(meta.q_lens_host)
        zeros = torch.zeros(num_seqs, dtype=torch.int32)
        tables = meta.block_tables.contiguous()
        whole = KeyItems(meta.cu_seqlens_q, tables, zeros, meta.seq_lens, causal=True)
        layout = cascade_layout(meta, self.cascade_min_saved_tokens)
        if layout is None:
            return CpuStepState(meta.slot_mapping, whole, None, None)
        own = KeyItems(meta.cu_seqlens_q, tables, layout.kv_start, meta.seq_lens, causal=True)
        prefixes = KeyItems(
            layout.cu_group_rows,
            layout.group_tables,
            torch.zeros(len(layout.group_prefix_len), dtype=torch.int32),
            layout.group_prefix_len,
            causal=False,
            rows=layout.group_rows,
        )
        return CpuStepState(meta.slot_mapping, whole, own, prefixes)

    def write_kv(self, state, key, value, k_cache, v_cache) -> None:
        write_kv(key, value, k_cache, v_cache, state.slot_mapping)

    def forward(self, state, query, k_cache, v_cache, scale, softcap=None, sliding_window=None):
        query = query.contiguous()  # (T, Hq, D); the model hands a transposed view
        out = torch.empty_like(query)
        if state.own is None or sliding_window:
            whole = state.whole
            return paged_attention(
                query, k_cache, v_cache, whole, scale, out, softcap=softcap, sliding_window=sliding_window
            )
        prefix = Partial(
            torch.empty(query.shape, dtype=torch.float32),
            torch.full(query.shape[:2], float("-inf"), dtype=torch.float32),
        )
        paged_attention(
            query, k_cache, v_cache, state.prefixes, scale, prefix.out, out_lse=prefix.lse, softcap=softcap
        )
        return paged_attention(query, k_cache, v_cache, state.own, scale, out, prior=prefix, softcap=softcap)
