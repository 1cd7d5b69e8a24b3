"""The KV block allocator: plain Python over block ids, no tensors.

Blocks are reference counted so that a block can be shared by several requests; it
returns to the free list when its last holder releases it. There is no LRU: batchrun's
plan knows every future user of a block, so nothing is kept "in case". The runner's KV
tensors hold one more block than the pool hands out: the null block (id ``num_blocks``),
which pads block tables and is never written for a real token.
"""

from __future__ import annotations


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    """Hands out block ids ``0 .. num_blocks - 1``: the most recently freed first (still warm
    in the CPU's caches; and the pool's memory is touched only up to its peak use), then
    never-used ids, lowest first."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() is next
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
        block = self._free.pop()
        self._refcount[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def share(self, block: int) -> None:
        """Add a holder to an allocated block."""
        if self._refcount[block] < 1:
            raise ValueError(f"block {block} is not allocated")
        self._refcount[block] += 1

    def share_all(self, blocks: list[int]) -> None:
        """``share`` each of ``blocks`` (a request attaching to a segment's blocks)."""
        refcount = self._refcount
        for block in blocks:
            if refcount[block] < 1:
                raise ValueError(f"block {block} is not allocated")
            refcount[block] += 1

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
