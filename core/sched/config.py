"""The scheduler's knobs: a frozen value validated once (no module globals to patch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    token_budget: int = 2048  # max tokens (decodes + prefill chunks) packed into one step
    reserve_full: bool = False  # reserve every request's whole max_tokens at admission (no preemption)
    # Expected-growth admission: after `min_observed` finished requests, a request without
    # an output-length hint is expected to produce `growth_margin` x the observed mean.
    min_observed: int = 8
    growth_margin: float = 1.5
    # Waiting requests admission looks past when they wait for a segment being written.
    max_skipped: int = 256

    @property
    def lookahead(self) -> int:
        """Waiting requests that make admission decide as if every request were queued: a
        step admits at most ``token_budget`` requests (each gets >= 1 token) and looks past at
        most ``max_skipped``, so it never reaches further down the queue than this."""
        return self.token_budget + self.max_skipped

    def __post_init__(self) -> None:
        if self.token_budget < 1:
            raise ValueError(f"token budget must be >= 1, got {self.token_budget}")
        if self.min_observed < 1 or self.growth_margin <= 0 or self.max_skipped < 0:
            raise ValueError("min_observed >= 1, growth_margin > 0 and max_skipped >= 0 are required")
