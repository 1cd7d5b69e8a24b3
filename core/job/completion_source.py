"""Where a job's completions come from: this process's engine, or workers elsewhere.

``generate`` (generate.py) journals and records every completion a source yields; it does
not care who computed it. ``LocalEngine`` is the one-process source; the Ray driver
(core/distributed/driver.py) is the other. A source must yield, for every request it is
given, exactly one completion (per sample), and for a row all of its ``n`` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.engine import Engine, build_engine
from batchrun.core.engine.stats import Completion, EngineInfo, EngineStats
from batchrun.core.runner.model_loader import LoadedModel
from batchrun.core.sched.request import Request

OnStep = Callable[[EngineStats], None]
SegmentUsers = Callable[[int], int]  # a shared segment's key -> how many requests read it


class CompletionSource(Protocol):
    dtype_choice: str  # why the engine's dtype (for the log and the report)

    def start(self, useful_tokens: int) -> EngineInfo:
        """Build the engine(s), their KV capped at ``useful_tokens`` positions (what the job
        could ever hold at once). The info's ``num_blocks`` is the smallest engine's."""
        ...

    def generate(
        self,
        requests: Iterable[Request],
        on_step: OnStep | None = None,
        segment_users: SegmentUsers | None = None,
    ) -> Iterator[Completion]:
        """Every request's completion, as they finish; ``on_step`` gets running totals.
        ``segment_users`` lets a source take ``requests`` lazily (see ``Engine.generate``)."""
        ...

    @property
    def stats(self) -> EngineStats:
        """Counters over the whole run (every worker's, for a distributed source)."""
        ...


class LocalEngine:
    """The engine in this process, on the model already loaded here."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded, self.config = loaded, config
        self.dtype_choice = loaded.dtype_choice
        self.engine: Engine | None = None

    def start(self, useful_tokens: int) -> EngineInfo:
        self.engine = build_engine(self.loaded, self.config, useful_tokens=useful_tokens)
        return self.engine.info

    def generate(
        self,
        requests: Iterable[Request],
        on_step: OnStep | None = None,
        segment_users: SegmentUsers | None = None,
    ) -> Iterator[Completion]:
        assert self.engine is not None, "start() first"
        return self.engine.generate(requests, on_step=on_step, segment_users=segment_users)

    @property
    def stats(self) -> EngineStats:
        assert self.engine is not None, "start() first"
        return self.engine.stats
