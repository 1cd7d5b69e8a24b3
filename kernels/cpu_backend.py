"""The CPU attention backend: paged attention that reads the KV cache in place, every shared
prefix read once per step, one kernel call per level of sharing plus one, whatever the number
of groups.

``build`` (once per step) finds the step's shared prefixes at every depth in its block tables
(kernels/cascade_levels.py: system prompt, then document, ...) — for decodes *and* prefill
chunks whose queries come after them — and lays the step out as kernel items (kernels/cpu/):

    part = paged_attention(every outermost span's rows, against the span's keys)    # float32 + LSE
    part = paged_attention(every next-level span's rows, its keys, from part)         # per level
    out  = paged_attention(each sequence's own rows, keys after its deepest span, from part)

Without a shared span (or in a sliding-window layer, where a span's part would need each
query's position) one call attends every sequence over its whole context. The kernel is
compiled for this CPU on first use (kernels/cpu/build.py); where it cannot be, ``auto``
runs the torch reference and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchrun.kernels.backend import AttentionBackend, BackendCapabilities
from batchrun.kernels.cascade_levels import cascade_levels
from batchrun.kernels.cpu import KeyItems, Partial, kernel, paged_attention
from batchrun.kernels.cpu.kv_write import write_kv
from batchrun.kernels.metadata import AttentionMetadata

# A level of sharing costs one more call per layer (for all of its spans at once) and spares
# (members - 1) reads of each span, so every span of two or more members is read once.
CPU_CASCADE_MIN_SAVED_TOKENS = 1


@dataclass
class CpuStepState:
    slot_mapping: torch.Tensor  # (T,) int64
    whole: KeyItems  # every sequence over its whole context
    own: KeyItems | None  # every sequence after its deepest shared span (None: no span)
    levels: tuple[KeyItems, ...] = ()  # the shared spans' rows against their keys, outermost first
    partial: Partial | None = None  # the spans' merged part, allocated by the first layer

    def prefix_buffers(self, query: torch.Tensor) -> Partial:
        """(T, Hq, D) outputs and (T, Hq) LSEs for the spans' part, reused by every layer of
        the step; rows in no span keep LSE -inf (no such part)."""
        if self.partial is None or self.partial.out.shape != query.shape:
            self.partial = Partial(
                torch.empty(query.shape, dtype=torch.float32),
                torch.full(query.shape[:2], float("-inf"), dtype=torch.float32),
            )
        return self.partial


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
        shared = cascade_levels(meta, self.cascade_min_saved_tokens)
        if shared is None:
            return CpuStepState(meta.slot_mapping, whole, None)
        own = KeyItems(meta.cu_seqlens_q, tables, shared.kv_start, meta.seq_lens, causal=True)
        levels = tuple(
            KeyItems(lv.cu_rows, lv.tables, lv.key_begin, lv.key_end, causal=False, rows=lv.rows)
            for lv in shared.levels
        )
        return CpuStepState(meta.slot_mapping, whole, own, levels)

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
        part = state.prefix_buffers(query)  # every span's rows are rewritten by this layer
        for depth, level in enumerate(state.levels):  # in place: a row is in one span per level
            prior = part if depth else None
            paged_attention(query, k_cache, v_cache, level, scale, part.out, part.lse, prior, softcap)
        return paged_attention(query, k_cache, v_cache, state.own, scale, out, prior=part, softcap=softcap)
