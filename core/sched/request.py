"""A request's state inside the engine: one sample of one row.

Following vLLM v1, a request does not have phases: it has ``num_tokens`` (prompt plus
output so far) and ``num_computed_tokens`` (tokens whose K/V are in the cache). Each step
brings computed up towards ``num_tokens``; when they meet, the next token is sampled.
A prefill chunk, a whole prompt, a decode step and the recomputation after a preemption
are the same operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from batchrun.core.params import SamplingParams


class SegmentRef(NamedTuple):
    """A shared prefix segment the request reads: prompt positions ``[start, end)``."""

    key: int
    start: int
    end: int


@dataclass(eq=False)
class Request:
    request_id: int  # the row index; completions are keyed by it
    prompt_ids: Sequence[int]  # a list, or a view into the job's PromptTokens array
    params: SamplingParams
    generator: torch.Generator | None = None  # per-row RNG: same sample whatever the batch
    sample_index: int = 0  # which of the row's n samples
    segments: tuple[SegmentRef, ...] = ()  # shared prefixes, outermost first, contiguous from 0
    expected_output: int | None = None  # the row's output-length hint, if it has one
    # The first-level group whose prefix it shares (key, prefix length in tokens), for the
    # cascade decode kernel; None when it shares nothing.
    prefix_group: tuple[int, int] | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # per output token, when asked for
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)  # KV blocks, in position order
    cached_tokens: int = 0  # prompt tokens read from segments another request computed
    num_preemptions: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not yet in the KV cache (the rest of the prompt, or the last sample)."""
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids at positions ``start:end`` of prompt + output."""
        n_prompt = len(self.prompt_ids)
        if start >= n_prompt:
            return self.output_ids[start - n_prompt : end - n_prompt]
        prompt = _as_list(self.prompt_ids[start : min(end, n_prompt)])
        return prompt if end <= n_prompt else prompt + self.output_ids[: end - n_prompt]


def _as_list(ids: Sequence[int]) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy views give Python ints
