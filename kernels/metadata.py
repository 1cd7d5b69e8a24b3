"""What an attention kernel needs to know about one packed step (no engine types here)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class AttentionMetadata(NamedTuple):
    """Layout of one packed, variable-length step over a paged KV cache, built once per step
    by the model runner and handed to the backend's ``build``.

    The step holds ``T`` new tokens from ``S`` sequences, packed back to back. Sequence
    ``i`` owns query rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``; after this step its cache
    holds ``seq_lens[i]`` tokens, so its queries sit at positions
    ``seq_lens[i] - q_len_i ... seq_lens[i] - 1`` and attend causally to cache positions
    ``0 .. own position``. Cache position ``p`` of sequence ``i`` lives in slot
    ``block_tables[i, p // block_size] * block_size + p % block_size``; table entries past
    a sequence's last block hold ``null_block``, a block no request owns.
    """

    slot_mapping: torch.Tensor  # (T,) int64: cache slot each new token's K/V is written to
    cu_seqlens_q: torch.Tensor  # (S + 1,) int32: query offsets, cu_seqlens_q[0] == 0
    seq_lens: torch.Tensor  # (S,) int32: cached tokens per sequence after this step
    block_tables: torch.Tensor  # (S, max_blocks) int32, right-padded with null_block
    null_block: int
    block_size: int
    # Host copies of the length vectors, so backends can plan without device syncs.
    q_lens_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]
    q_starts_host: tuple[int, ...]  # cu_seqlens_q
    # The plan's first-level groups: per sequence, the key of the group whose prefix it
    # shares (-1: none) and that prefix's length in tokens (a multiple of block_size; the
    # group's members hold the same blocks for it). Backends that read a group's prefix
    # once use these; the others ignore them.
    group_keys_host: tuple[int, ...] = ()
    group_prefix_lens_host: tuple[int, ...] = ()
    # The step runs in a CUDA graph (core/runner/cuda_graphs.py): a backend must then keep
    # every tensor of its state shaped by T, S and the table width alone, and every host
    # value its launches bake in coarse enough that other steps share it (graph_inputs).
    static_shapes: bool = False
