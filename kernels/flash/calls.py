"""One ``varlen_attn`` call of a step: planned once in the backend's ``build``, run per layer.

A call attends N query sequences — rows of the step's packed queries — each to its own run of
keys in the paged cache, ``key_lens[i]`` keys from the first slot of its block
``first_block[i]``. Where the function reads the pool in place (``block_table``), the plan is
each sequence's block table starting at that block, and its key count (``seqused_k``); where
it cannot (torch 2.11), the plan is the cache slot of every key, packed, and each layer
gathers the keys into a contiguous copy — repeated over the query heads of each KV head if
the function has no ``enable_gqa`` either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from batchrun.kernels.flash.varlen import LSE, VarlenFeatures, VarlenKernel, lse_rows


@dataclass(frozen=True)
class VarlenCall:
    rows: torch.Tensor | None  # (Tq,) int64: the step's query rows, sequence by sequence (None: all)
    cu_seq_q: torch.Tensor  # (N + 1,) int32: query offsets within those rows
    cu_seq_k: torch.Tensor  # (N + 1,) int32: key offsets (of the packed copy, when gathered)
    max_q: int
    max_k: int
    seqused_k: torch.Tensor  # (N,) int32: keys per sequence
    block_table: torch.Tensor | None  # (N, W) int32: each sequence's blocks from its first (in place)
    slots: torch.Tensor | None  # (Tk,) int64: cache slot of every key, packed (gathered)


def plan_call(
    tables: torch.Tensor,  # (N, W) int32 block tables, padded with the null block
    first_block: torch.Tensor | None,  # (N,) int: each sequence's first block to read (None: 0)
    key_lens: Sequence[int],  # host copy: keys per sequence, each >= 1
    cu_seq_q: torch.Tensor,  # (N + 1,) int32
    max_q: int,
    block_size: int,
    in_place: bool,
    rows: torch.Tensor | None = None,  # (Tq,) int64, None: every row of the step in order
) -> VarlenCall:
    """Plan one call; only index tensors, no keys are touched."""
    device = tables.device
    if first_block is not None:  # shift each row left by its first block
        width = tables.shape[1]
        cols = torch.arange(width, device=device) + first_block.long()[:, None]
        # columns shifted in from past the end repeat the last one, which lies past the
        # sequence's keys (null-block padding or a block beyond seqused_k): never read
        tables = tables.gather(1, cols.clamp_(max=width - 1))
    cu_k = [0, *accumulate(key_lens)]
    seqused_k = torch.tensor(key_lens, dtype=torch.int32).to(device)
    cu_seq_k = torch.tensor(cu_k, dtype=torch.int32).to(device)
    if in_place:
        return VarlenCall(
            rows, cu_seq_q, cu_seq_k, max_q, max(key_lens), seqused_k, tables.contiguous(), None
        )
    # slot of key p of sequence i: tables[i, p // block_size] * block_size + p % block_size
    total = cu_k[-1]
    seq = torch.repeat_interleave(
        torch.arange(len(key_lens), device=device), seqused_k.long(), output_size=total
    )  # (Tk,) the sequence of each packed key
    pos = torch.arange(total, device=device) - cu_seq_k[:-1].long()[seq]  # (Tk,) its position
    slots = tables[seq, pos // block_size].long() * block_size + pos % block_size
    return VarlenCall(rows, cu_seq_q, cu_seq_k, max_q, max(key_lens), seqused_k, None, slots)


def run_call(
    kernel: VarlenKernel,
    features: VarlenFeatures,
    call: VarlenCall,
    query: torch.Tensor,  # (T, Hq, D): the whole step
    k_cache: torch.Tensor,  # (num_blocks + 1, block_size, Hkv, D)
    v_cache: torch.Tensor,
    scale: float,
    window: tuple[int, int],  # varlen_attn's window_size: (-1, 0) causal, (-1, -1) full
    with_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The call's output (Tq, Hq, D) and, if asked, its natural-log LSE (Tq, Hq)."""
    q = query if call.rows is None else query.index_select(0, call.rows)  # (Tq, Hq, D)
    options = dict(scale=scale, window_size=window, return_aux=LSE if with_lse else None)
    if call.block_table is not None:
        k, v = k_cache, v_cache  # the pool, read in place through the block table
        options.update(block_table=call.block_table, seqused_k=call.seqused_k)
    else:
        k = k_cache.flatten(0, 1).index_select(0, call.slots)  # (Tk, Hkv, D), packed
        v = v_cache.flatten(0, 1).index_select(0, call.slots)
    group = q.shape[1] // k.shape[-2]  # query heads per KV head; query head h reads KV head h // group
    if features.gqa:
        options["enable_gqa"] = group > 1
    elif group > 1:
        k = k.repeat_interleave(group, dim=-2)  # (..., Hq, D)
        v = v.repeat_interleave(group, dim=-2)
    if features.num_splits:
        options["num_splits"] = 1  # batch-invariant: a row's result does not depend on the batch
    result = kernel.attend(q, k, v, call.cu_seq_q, call.cu_seq_k, call.max_q, call.max_k, **options)
    if not with_lse:
        return result, None
    out, lse = result
    return out, lse_rows(lse, q.shape[0], q.shape[1])
