"""The step message between scheduler and runner, and the runner's typed answer.

Plain values only (ints, tuples, NumPy arrays, ``SamplingParams``): a message pickles, so a
runner can live in another process. Following vLLM v1's ``SchedulerOutput``, a request
is sent in full once (``NewRequest``); afterwards a step only says how many of its tokens
run and which blocks it gained. The runner keeps its own block tables and token ids,
updated from these messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from batchrun.core.params import SamplingParams


@dataclass(frozen=True)
class NewRequest:
    """A request the runner does not hold yet: admitted now, or back after a preemption."""

    req_id: int
    token_ids: np.ndarray  # int32 (num_tokens,): prompt, then the outputs sampled so far
    prompt_len: int
    num_computed_tokens: int  # positions already in the cache (shared blocks it attached to)
    block_ids: tuple[int, ...]  # every block it holds, this step's included
    params: SamplingParams
    seed: int | None  # sampled requests: output token k draws from a generator seeded by (seed, k)
    prefix_group: tuple[int, int] | None  # (group key, shared prefix tokens) or None


@dataclass(frozen=True)
class ScheduledChunk:
    req_id: int
    num_tokens: int  # tokens computed this step, starting at the request's computed count
    samples: bool  # the chunk completes the request's pending tokens: a token is sampled


@dataclass(frozen=True)
class StepPlan:
    """What runs in one step, in packing order (decodes first, then prefill chunks)."""

    chunks: tuple[ScheduledChunk, ...]
    new_requests: tuple[NewRequest, ...] = ()
    new_block_ids: dict[int, tuple[int, ...]] = field(default_factory=dict)  # for known requests
    # Requests the runner must forget before this step: finished for good, or preempted
    # (those come back later as a NewRequest).
    finished_req_ids: tuple[int, ...] = ()
    preempted_req_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True)
class StepResult:
    """The runner's answer: the token sampled for each chunk whose ``samples`` was true."""

    req_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: dict[int, dict] = field(default_factory=dict)  # for requests that asked
