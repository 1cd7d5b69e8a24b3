"""The paged KV cache's tensors: one K and one V tensor per layer, indexed by block id.

Block ids come from the scheduler's ``BlockPool`` (ids ``0 .. num_blocks - 1``); the
tensors hold one more block, the *null block* (id ``num_blocks``), which pads block tables
so that a kernel reading past a sequence's last block reads memory no request owns.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the cache for one model: what one block of all layers costs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int

    @property
    def bytes_per_block(self) -> int:
        per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim
        return per_token * self.block_size * torch.finfo(self.dtype).bits // 8

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @classmethod
    def from_config(cls, config, dtype: torch.dtype, block_size: int) -> KVCacheSpec:
        """The spec of a transformers model config (its text config for multimodal ones)."""
        config = config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            dtype=dtype,
            block_size=block_size,
        )


class KVCache:
    """Per-layer K and V tensors, each ``(num_blocks + 1, block_size, num_kv_heads, head_dim)``:
    ``num_blocks`` allocatable blocks, then the null block. Every element starts at zero.

    On CPU the tensors are views of one anonymous memory mapping, whose pages the OS hands
    out (zeroed) when they are first written: the pool costs resident memory only for the
    blocks ever used, and the block pool reuses freed blocks first, so a pool sized for a
    whole job costs what its peak use costs.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        shape = (num_blocks + 1, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.spec = spec
        self.num_blocks = num_blocks  # allocatable; the pool hands out ids below this
        self.null_block = num_blocks
        count = 2 * spec.num_layers
        if device.type == "cpu":
            tensors = _zero_pages(count, shape, spec.dtype)
        else:
            tensors = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(count)]
        self.keys = tensors[: spec.num_layers]
        self.values = tensors[spec.num_layers :]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]


def _zero_pages(count: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """``count`` zero tensors of ``shape`` backed by one anonymous mapping (touched lazily;
    the tensors keep the mapping alive)."""
    numel = math.prod(shape)
    mapping = mmap.mmap(-1, count * numel * dtype.itemsize)
    flat = torch.frombuffer(mapping, dtype=dtype)
    return [flat[i * numel : (i + 1) * numel].view(shape) for i in range(count)]
