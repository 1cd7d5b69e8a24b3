"""A request's state inside the engine.

Following vLLM v1, a request does not have phases: it has ``num_tokens`` (prompt plus
output so far) and ``num_computed_tokens`` (tokens whose K/V are in the cache). Each step
brings computed up towards ``num_tokens``; when they meet, the next token is sampled.
A prefill chunk, a whole prompt and a decode step are the same operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from batchrun.core.params import SamplingParams


@dataclass(eq=False)
class Request:
    request_id: int  # the row index; completions are keyed by it
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None  # per-row RNG: same sample whatever the batch
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)  # KV blocks, in position order
    reserved_blocks: int = 0  # blocks set aside for this request at admission

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
        if end <= n_prompt:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]
