"""The flash attention backend: FlashAttention's kernels through torch's own
``torch.nn.attention.varlen.varlen_attn`` (no extra package), the shared prefix read once
per group as in the Triton backend.

``build`` (once per step) picks the plan's first-level groups whose members' queries all sit
after the group's shared prefix (kernels/cascade_layout.py) and plans each call's index
tensors (kernels/flash/calls.py); every layer then runs

    own    = varlen_attn(every sequence's queries, its keys after its group's prefix)  # causal, LSE
    prefix = varlen_attn(every split group's rows, the group's prefix blocks)          # full, LSE
    out[group rows] = merge(own, prefix)                          # log-sum-exp, natural log

and, without a split group or in a sliding-window layer (the prefix call knows no query
positions), one causal call over every sequence's whole context. New keys and values are
stored with the torch reference's ``index_copy_``.

In place or gathered: torch >= 2.12's varlen_attn reads the paged pool through a block table
(FlashAttention 2 needs the page size, our block size, to be a multiple of 256); torch 2.11's
cannot, so there each layer gathers every call's keys into a packed copy — correct, and
testable on that torch, but not in place: the capabilities say so (``in_place``) and ``auto``
never picks it. No soft-capping (varlen_attn has no such argument): those models are refused.
What the kernel does, with the sources checked: kernels/flash/varlen.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from batchrun.kernels.backend import AttentionBackend, BackendCapabilities
from batchrun.kernels.cascade import merge
from batchrun.kernels.cascade_layout import cascade_layout
from batchrun.kernels.flash import (
    FLASH_HEAD_DIMS,
    VarlenCall,
    VarlenFeatures,
    VarlenKernel,
    plan_call,
    run_call,
    torch_varlen,
)
from batchrun.kernels.metadata import AttentionMetadata
from batchrun.kernels.torch_ref import write_kv

# Splitting costs one more call and a merge per layer, not per group, so every group of two
# or more members is split. Unmeasured on a GPU: the GPU benchmark should set this.
FLASH_CASCADE_MIN_SAVED_TOKENS = 1


@dataclass(frozen=True)
class FlashStepState:
    slot_mapping: torch.Tensor  # (T,) int64
    whole: VarlenCall  # every sequence over its whole context
    own: VarlenCall | None  # every sequence over its keys after its group's prefix (None: no split)
    prefixes: VarlenCall | None  # every split group's query rows over the group's prefix


class FlashBackend(AttentionBackend):
    name = "flash"

    def __init__(
        self,
        cascade_min_saved_tokens: int = FLASH_CASCADE_MIN_SAVED_TOKENS,
        kernel: VarlenKernel | None = None,  # None: torch's varlen_attn
    ) -> None:
        self.cascade_min_saved_tokens = cascade_min_saved_tokens
        self.kernel = kernel if kernel is not None else torch_varlen()
        self.features = VarlenFeatures.of(self.kernel.attend)
        in_place = self.features.paged
        self.capabilities = BackendCapabilities(
            devices=self.kernel.devices,
            dtypes=self.kernel.dtypes,
            block_size_multiple=self.kernel.page_size_multiple if in_place else 1,
            head_dims=FLASH_HEAD_DIMS,
            softcap=False,
            sliding_window=True,
            shared_prefix=True,
            in_place=in_place,
        )

    @property
    def description(self) -> str:
        if self.capabilities.in_place:
            return "FlashAttention (torch's varlen_attn), reading the paged KV cache in place"
        return (
            "FlashAttention (torch's varlen_attn), gathering each call's keys into a packed copy: "
            f"torch {torch.__version__}'s varlen_attn cannot read the paged KV cache in place"
        )

    def build(self, meta: AttentionMetadata) -> FlashStepState:
        plan = partial(plan_call, block_size=meta.block_size, in_place=self.capabilities.in_place)
        max_q = max(meta.q_lens_host)
        whole = plan(meta.block_tables, None, meta.seq_lens_host, meta.cu_seqlens_q, max_q)
        layout = cascade_layout(meta, self.cascade_min_saved_tokens)
        if layout is None:
            return FlashStepState(meta.slot_mapping, whole, None, None)
        own_lens = [n - start for n, start in zip(meta.seq_lens_host, layout.kv_start_host, strict=True)]
        first_block = layout.kv_start // meta.block_size  # prefix lengths are whole blocks
        own = plan(meta.block_tables, first_block, own_lens, meta.cu_seqlens_q, max_q)
        prefixes = plan(
            layout.group_tables,
            None,
            layout.group_prefix_len_host,
            layout.cu_group_rows,
            layout.max_group_rows,
            rows=layout.group_rows.long(),
        )
        return FlashStepState(meta.slot_mapping, whole, own, prefixes)

    def write_kv(self, state, key, value, k_cache, v_cache) -> None:
        write_kv(key, value, k_cache, v_cache, state.slot_mapping)

    def forward(self, state, query, k_cache, v_cache, scale, softcap=None, sliding_window=None):
        if softcap:
            raise ValueError("the flash backend cannot soft-cap attention scores")
        run = partial(run_call, self.kernel, self.features, query=query, k_cache=k_cache, v_cache=v_cache)
        if state.own is None or sliding_window:
            # a window of W (transformers' sliding_window) sees the last W keys, itself included
            window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
            return run(state.whole, scale=scale, window=window, with_lse=False)[0]
        out, lse = run(state.own, scale=scale, window=(-1, 0), with_lse=True)  # (T, Hq, D), (T, Hq)
        prefix, prefix_lse = run(state.prefixes, scale=scale, window=(-1, -1), with_lse=True)  # (Tg, ...)
        rows = state.prefixes.rows  # (Tg,) int64
        merged = merge(out.index_select(0, rows), lse.index_select(0, rows), prefix, prefix_lse)
        return out.index_copy_(0, rows, merged)
