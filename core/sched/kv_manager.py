"""KV-block mechanism for the scheduler: which blocks each request holds, and how shared
segments are attached, written and freed. The scheduler decides; this module does.

Modelled on vLLM v1's ``KVCacheManager.allocate_slots``: the scheduler asks for the
blocks of a request's next chunk and gets them, or ``None`` when the pool cannot give
them (then it preempts and asks again). Block ids only; no tensors.

A request's blocks, in position order::

    | segment 0 (shared) | segment 1 (shared) | own blocks ... |
    ^ attached: refcount +1 per request      ^ allocated for it alone

A request that starts before a segment it needs is complete becomes that segment's
*writer*: the blocks it opens inside the segment are allocated for the segment (which
holds one reference) and shared with the writer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from batchrun.core.sched.block_pool import BlockPool
from batchrun.core.sched.request import Request
from batchrun.core.sched.segments import SharedPrefixes, SharedSegment


class KVManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.prefixes = SharedPrefixes(pool)
        self._writing: dict[Request, list[SharedSegment]] = {}  # writers and their segments

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    # -- segments ----------------------------------------------------------------------

    def announce(self, users_of: Callable[[int], int]) -> None:
        """Each segment key's number of users, known ahead (requests then register lazily)."""
        self.prefixes.announce(users_of)

    def register(self, request: Request) -> None:
        """Count ``request`` as a user of each of its segments (before it is scheduled)."""
        for ref in request.segments:
            self.prefixes.register(*ref)

    def attach_point(self, request: Request) -> int | None:
        """Positions of ``request``'s prompt already in the cache (through its segments), or
        None while the next segment it needs is being written by another request."""
        chain = self.prefixes.chain(_keys(request))
        ready = [s for s in chain if s.complete]
        rest = chain[len(ready) :]
        if rest and rest[0].writer is not None:
            return None
        return rest[0].computed if rest else (ready[-1].end if ready else 0)

    def start(self, request: Request, upto: int) -> None:
        """Attach ``request`` to its segments' blocks below ``upto`` and make it the writer of
        the segments not yet complete."""
        chain = self.prefixes.chain(_keys(request))
        for segment in chain:
            blocks = segment.block_ids[: self.blocks_for(min(upto, segment.end) - segment.start)]
            self.pool.share_all(blocks)
            request.block_ids.extend(blocks)
            if segment.end >= upto:
                break
        rest = [s for s in chain if not s.complete]
        if rest:
            for segment in rest:
                segment.writer = request
            self._writing[request] = rest

    def computed(self, request: Request) -> None:
        """``request`` advanced: so did the segments it writes."""
        segments = self._writing.get(request)
        if not segments:
            return
        for segment in segments:
            segment.computed = max(segment.computed, min(request.num_computed_tokens, segment.end))
        if segments[-1].complete:
            self._stop_writing(request)

    # -- blocks ------------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_tokens: int) -> list[int] | None:
        """Give ``request`` the blocks its next ``num_tokens`` positions land in; return the
        blocks added to its table, or None (nothing changed) if the pool is short."""
        opened = list(self._opened_blocks(request, num_tokens))
        fresh = sum(segment is None or k >= len(segment.block_ids) for segment, k in opened)
        if fresh > self.pool.num_free:
            return None
        added = []
        for segment, k in opened:
            if segment is None:
                block = self.pool.allocate()
            else:
                if k == len(segment.block_ids):
                    segment.block_ids.append(self.pool.allocate())  # the segment's own reference
                block = segment.block_ids[k]
                self.pool.share(block)
            request.block_ids.append(block)
            added.append(block)
        return added

    def free(self, request: Request) -> None:
        """Release the blocks ``request`` holds (finished or preempted). A segment keeps its
        blocks, and what its writer computed, for its other users."""
        self._stop_writing(request)
        self.pool.release(request.block_ids)
        request.block_ids = []

    def finished(self, request: Request) -> None:
        """``request`` is done for good: free its blocks, and each of its segments after the
        segment's last user."""
        self.free(request)
        self.prefixes.user_finished(_keys(request))

    def dropped(self, request: Request) -> None:
        """``request`` will never run: give up its segment uses."""
        self.prefixes.user_finished(_keys(request))

    def _opened_blocks(self, request: Request, num_tokens: int) -> Iterator[tuple[SharedSegment | None, int]]:
        """For each block the request's next chunk opens: the segment it writes the block for
        and the block's index in that segment, or ``(None, 0)`` for a block of its own."""
        bs = self.block_size
        writing = self._writing.get(request, ())
        for index in range(len(request.block_ids), self.blocks_for(request.num_computed_tokens + num_tokens)):
            position = index * bs
            segment = next((s for s in writing if s.start <= position < s.end), None)
            yield segment, (position - segment.start) // bs if segment else 0

    def _stop_writing(self, request: Request) -> None:
        for segment in self._writing.pop(request, ()):
            segment.writer = None


def _keys(request: Request) -> tuple[int, ...]:
    return tuple(ref.key for ref in request.segments)
