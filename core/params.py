"""Sampling parameters: job defaults, per-row overrides, and their validation."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any

# Keys a row may carry to override the job's defaults (vLLM's SamplingParams names).
ROW_PARAM_KEYS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "min_tokens",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "logprobs",
)
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
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (0 = off)
    seed: int | None = None  # None: derived from the job seed and the row index
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # sampling one of these ends the row (kept in token ids)
    include_stop_str_in_output: bool = False  # keep the matched stop string / stop token's text
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS, stop tokens and stop strings cannot end the row before this
    # Penalties, as vLLM applies them: repetition over prompt + output (divide positive
    # logits, multiply negative ones; 1 = off), presence and frequency over the output.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1  # samples per row; they share the prompt's KV blocks
    logprobs: int | None = None  # None: none; K: each token's logprob and the K most likely

    def __post_init__(self) -> None:
        check_int("max_tokens", self.max_tokens, minimum=1)
        check_number("temperature", self.temperature, minimum=0.0)
        check_number("top_p", self.top_p, minimum=0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError(f"top_p must be in (0, 1], got {self.top_p}")
        check_int("top_k", self.top_k, minimum=-1)
        check_number("min_p", self.min_p, minimum=0.0)
        if self.min_p > 1.0:
            raise ParamError(f"min_p must be in [0, 1], got {self.min_p}")
        check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ParamError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        check_number("repetition_penalty", self.repetition_penalty, minimum=0.0)
        if self.repetition_penalty == 0:
            raise ParamError("repetition_penalty must be > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            check_number(name, getattr(self, name), minimum=-2.0)
            if getattr(self, name) > 2.0:
                raise ParamError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for token in self.stop_token_ids:
            check_int("stop_token_ids", token, minimum=0)
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ParamError(
                f"include_stop_str_in_output must be true or false, got {self.include_stop_str_in_output!r}"
            )
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

    @property
    def penalized(self) -> bool:
        """Whether the logits change with the tokens seen so far."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def with_overrides(self, overrides: dict[str, Any]) -> SamplingParams:
        """Return a copy with the non-null values of ``overrides`` applied (validated); ``self``
        when there is none, so rows without overrides share one object (a million rows)."""
        changes = {k: _integral(k, v) for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        if "stop" in changes:
            changes["stop"] = normalize_stop(changes["stop"])
        if "stop_token_ids" in changes:
            value = changes["stop_token_ids"]
            if not isinstance(value, (list, tuple)):
                raise ParamError(f"stop_token_ids must be a list of token ids, got {value!r}")
            changes["stop_token_ids"] = tuple(value)
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


def row_seed(job_seed: int, row_id: str) -> int:
    """A stable 63-bit seed for a row without its own ``seed``: from the job seed and row id."""
    digest = hashlib.blake2b(f"{job_seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
