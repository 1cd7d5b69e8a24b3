"""What the Triton kernels support, declared once so a backend can check before it plans.

Block sizes: any (a KV tile gathers its keys position by position through the block table,
``page = table[pos // block_size]``, so the tile width does not depend on the block size;
16, 32 and 64 are tested on random steps, 1, 8, 48 and 128 on fixed ones). Head dims:
multiples of 8 from 16 to 256. ``tl.arange`` needs a power of two and ``tl.dot`` at least 16,
so the kernels work on the head dim rounded up to a power of two (``HEAD_DIM_P``) and mask the
columns past the model's: they load as 0, which adds nothing to a score or an output (32, 64,
128, and 48, 80, 96 tested). GQA: any number of query heads per kv head up to 16 (1, 2, 4, 8, 3
and 16 tested).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Capabilities(NamedTuple):
    dtypes: tuple[torch.dtype, ...]
    max_gqa_group: int
    paged_softcap: bool
    paged_sliding_window: bool
    paged_kv_start: bool
    paged_split_kv: bool  # a second reduce pass for long contexts
    prefix_softcap: bool
    prefix_sliding_window: bool


CAPABILITIES = Capabilities(
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    max_gqa_group=16,
    paged_softcap=True,
    paged_sliding_window=True,
    paged_kv_start=True,
    paged_split_kv=True,  # split_kv.py: a tile's keys over several programs, then a reduce
    prefix_softcap=True,
    # The prefix part is non-causal and knows no query positions; a windowed model must not
    # use the cascade split unless the window covers every sequence (then pass no window).
    prefix_sliding_window=False,
)


def supported_block_size(block_size: int) -> bool:
    """KV cache block sizes the kernels accept: any positive size."""
    return block_size >= 1


def supported_head_dim(head_dim: int) -> bool:
    """Head dims the kernels accept: multiples of 8 from 16 to 256 (a head's row stays 16-byte
    aligned in half precision; the kernels pad the others to the next power of two, masked)."""
    return 16 <= head_dim <= 256 and head_dim % 8 == 0
