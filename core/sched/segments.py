"""Shared-prefix segments inside the engine: whose KV blocks they are and when they die.

A segment (from the plan, or the prompt of a row sampled ``n > 1`` times) covers the
block-aligned prompt positions ``[start, end)`` of every request listing it in
``Request.segments``. Its blocks are computed once, by one request (the segment's
*writer*, the first user admitted), and then referenced by every other user.

Reference counts (in ``BlockPool``): each block holds one reference for the segment itself
while any of its users is unfinished, plus one per running request attached to it. So a
shared block is freed exactly when its last user finishes, and preempting a user never
drops blocks its fellow users (or its own recomputation) still need. No LRU, no guessing:
the number of users is known before the first one runs.

The count comes either from registration (every user registered before the first one can
finish: the engine's eager path) or is *announced* (``announce``): then users may register
lazily, as they are admitted, and a segment still lives until its announced last user is
done, however late that user registers. A segment never sees more users than announced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from batchrun.core.sched.block_pool import BlockPool


@dataclass(eq=False)
class SharedSegment:
    key: int
    start: int  # first prompt position (block aligned)
    end: int  # one past the last position (block aligned, < every user's prompt length)
    unfinished_users: int = 0
    registered: int = 0  # users registered so far (<= the announced count, if any)
    block_ids: list[int] = field(default_factory=list)  # blocks of [start, start + len * block_size)
    computed: int = 0  # positions [start, computed) hold valid KV; == end when complete
    writer: object | None = None  # the request computing it now, if any

    def __post_init__(self) -> None:
        self.computed = self.start

    @property
    def complete(self) -> bool:
        return self.computed == self.end


class SharedPrefixes:
    """All live segments of a run, keyed by segment key."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.segments: dict[int, SharedSegment] = {}
        self._announced: Callable[[int], int] | None = None

    def announce(self, users_of: Callable[[int], int]) -> None:
        """From now on, a segment's users are ``users_of(key)`` (every request that will ever
        list it), not the users registered so far; set before any segment exists."""
        if self.segments:
            raise ValueError("announce user counts before registering any segment")
        self._announced = users_of

    def register(self, key: int, start: int, end: int) -> None:
        """Count one more user of segment ``key`` (created on its first user)."""
        segment = self.segments.get(key)
        if segment is None:
            segment = self.segments[key] = SharedSegment(key, start, end)
            if self._announced is not None:
                segment.unfinished_users = self._announced(key)
        elif (segment.start, segment.end) != (start, end):
            known = f"[{segment.start}, {segment.end})"
            raise ValueError(f"segment {key} registered as [{start}, {end}) and as {known}")
        segment.registered += 1
        if self._announced is None:
            segment.unfinished_users += 1
        elif segment.registered > self._announced(key):
            raise ValueError(f"segment {key}: more users than the {self._announced(key)} announced")

    def chain(self, keys: tuple[int, ...]) -> list[SharedSegment]:
        return [self.segments[k] for k in keys]

    def user_finished(self, keys: tuple[int, ...]) -> None:
        """A user of these segments is done for good; free a segment after its last user."""
        for key in keys:
            segment = self.segments[key]
            segment.unfinished_users -= 1
            if segment.unfinished_users == 0:
                self.pool.release(segment.block_ids)
                del self.segments[key]

    @property
    def num_blocks(self) -> int:
        return sum(len(s.block_ids) for s in self.segments.values())
