"""Sampling parameters: job defaults, per-row overrides, and their validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# Keys a row may carry to override the job's defaults.
ROW_PARAM_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs")
MAX_TOP_LOGPROBS = 20


class ParamError(ValueError):
    """A sampling parameter is invalid; the message names the field and says what is allowed."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one row. ``temperature == 0`` means greedy decoding."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None  # None: derived from the job seed and the row index
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # samples per row; they share the prompt's KV blocks
    logprobs: int | None = None  # None: none; K: each token's logprob and the K most likely

    def __post_init__(self) -> None:
        check_int("max_tokens", self.max_tokens, minimum=1)
        check_number("temperature", self.temperature, minimum=0.0)
        check_number("top_p", self.top_p, minimum=0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError(f"top_p must be in (0, 1], got {self.top_p}")
        check_int("top_k", self.top_k, minimum=-1)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)
        check_int("n", self.n, minimum=1)
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_TOP_LOGPROBS:
                raise ParamError(f"logprobs must be <= {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop must be a non-empty string or a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_overrides(self, overrides: dict[str, Any]) -> SamplingParams:
        """Return a copy with the non-null values of ``overrides`` applied (validated)."""
        changes = {k: _integral(k, v) for k, v in overrides.items() if v is not None}
        if "stop" in changes:
            changes["stop"] = normalize_stop(changes["stop"])
        if "top_k" in changes and changes["top_k"] == -1:
            changes["top_k"] = 0  # OpenAI / vLLM spell "disabled" as -1
        return dataclasses.replace(self, **changes)


INT_KEYS = ("max_tokens", "top_k", "seed", "n", "logprobs")


def _integral(key: str, value: Any) -> Any:
    """An integral float (4.0) as an int: pandas turns an optional integer column into floats."""
    if key in INT_KEYS and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def normalize_stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ParamError(f"stop must be a string or a list of strings, got {type(value).__name__}")


def check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ParamError(f"{name} must be >= {minimum}, got {value}")


def check_number(name: str, value: Any, *, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ParamError(f"{name} must be a number, got {value!r}")
    if value < minimum:
        raise ParamError(f"{name} must be >= {minimum}, got {value}")
