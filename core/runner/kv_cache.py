"""The paged KV cache: a plain-Python block allocator and the per-layer tensors it indexes.

Blocks are reference counted so that a block can be shared by several requests; it
returns to the free list when its last holder releases it. There is no LRU: batchrun's
plan knows every future user of a block, so nothing is kept "in case".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    """Hands out block ids ``0 .. num_blocks - 1``; lowest ids first, freed ids reused last."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        block = self._free.popleft()
        self._refcount[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def share(self, block: int) -> None:
        """Add a holder to an allocated block."""
        if self._refcount[block] < 1:
            raise ValueError(f"block {block} is not allocated")
        self._refcount[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one holder from each block; blocks with no holder left become free."""
        for block in blocks:
            if self._refcount[block] < 1:
                raise ValueError(f"block {block} released more times than it was held")
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                self._free.append(block)

    def refcount(self, block: int) -> int:
        return self._refcount[block]


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
    """Per-layer K and V tensors, each ``(num_blocks, block_size, num_kv_heads, head_dim)``."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.spec = spec
        self.num_blocks = num_blocks
        self.keys = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        self.values = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]
