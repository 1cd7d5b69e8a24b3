"""Wall time per phase of a command (read, tokenize, plan, load, generate, write)."""

from __future__ import annotations

import time


class PhaseTimer:
    """``lap(name)`` records the seconds since the previous lap (or creation) under ``name``."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = dict(seconds or {})
        self._clock = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._clock
        self._clock = now
