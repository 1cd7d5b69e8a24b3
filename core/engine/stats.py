"""What the engine yields per finished request, and what it counts while running."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Completion:
    row: int  # the request's row (Request.row)
    token_ids: list[int]  # generated tokens, including a final EOS if one was sampled
    text: str  # decoded output, without EOS and cut before a matched stop string
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    sample_index: int = 0
    cached_tokens: int = 0  # prompt tokens read from shared blocks another request computed
    logprobs: list[dict] | None = None  # per token, when the request asked for them


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0  # over all requests (a row sampled n times counts n times)
    prefill_tokens: int = 0  # prompt positions computed, recomputation after preemption included
    decode_tokens: int = 0  # positions after the prompt computed
    sampled_tokens: int = 0  # output tokens sampled (a prompt's last position samples one too)
    cached_prompt_tokens: int = 0  # prompt positions read from shared blocks instead
    finished_prompt_tokens: int = 0  # prompt tokens of the requests finished so far
    steps: int = 0
    preemptions: int = 0
    peak_blocks: int = 0
    num_blocks: int = 0
    block_size: int = 0
    seconds: float = 0.0  # wall time of the generation loop
    kv_blocks_used: int = 0  # blocks held right now (updated every step)
    graph_steps: int = 0  # steps replayed from a CUDA graph
    cuda_graphs: int = 0  # graphs captured

    @property
    def saving(self) -> float:
        """Share of prompt tokens not computed: 1 - prefill_tokens / prompt_tokens."""
        return 1.0 - self.prefill_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def live_saving(self) -> float:
        """The saving over the requests finished so far (for progress reports)."""
        done = self.finished_prompt_tokens
        return self.cached_prompt_tokens / done if done else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return (self.prefill_tokens + self.decode_tokens) / max(self.steps, 1)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, float | int]:
        fields = dict(self.__dict__)
        return fields | {
            "saving": self.saving,
            "mean_tokens_per_step": self.mean_tokens_per_step,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@dataclass(frozen=True)
class EngineInfo:
    """What an engine was built with, for logs and reports."""

    device: str
    dtype: str
    attention_backend: str
    attention_backend_choice: str  # why that backend (auto's reasoning, or the option)
    block_size: int
    num_blocks: int
    kv_cache_bytes: int
    token_budget: int
