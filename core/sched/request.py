"""A request's state on the scheduler's side: one sample of one row. No tensors.

Following vLLM v1, a request does not have phases: it has ``num_tokens`` (prompt plus
output so far) and ``num_computed_tokens`` (tokens whose K/V are in the cache). Each step
brings computed up towards ``num_tokens``; when they meet, the next token is sampled.
A prefill chunk, a whole prompt, a decode step and the recomputation after a preemption
are the same operation.

The runner never sees this object: it gets what it needs through the step message
(messages.py) and keeps its own copy of the token ids and block table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from batchrun.core.params import SamplingParams


class SegmentRef(NamedTuple):
    """A shared prefix segment the request reads: prompt positions ``[start, end)``."""

    key: int
    start: int
    end: int


@dataclass(eq=False)
class Request:
    row: int  # the caller's key (the row index); completions carry it back
    prompt_ids: Sequence[int]  # a list, or a view into the job's PromptTokens array
    params: SamplingParams
    seed: int | None = None  # sampled rows: the same seed gives the same sample in any batch
    sample_index: int = 0  # which of the row's n samples
    segments: tuple[SegmentRef, ...] = ()  # shared prefixes, outermost first, contiguous from 0
    expected_output: int | None = None  # the row's output-length hint, if it has one
    # The first-level group whose prefix it shares (key, prefix length in tokens), for the
    # shared-prefix attention kernels; None when it shares nothing.
    prefix_group: tuple[int, int] | None = None
    req_id: int = -1  # unique in an engine; set when the scheduler takes the request
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

    def all_token_ids(self) -> np.ndarray:
        """Prompt followed by the output so far, int32 ``(num_tokens,)``."""
        prompt = np.asarray(self.prompt_ids, dtype=np.int32)
        if not self.output_ids:
            return prompt
        return np.concatenate([prompt, np.asarray(self.output_ids, dtype=np.int32)])
