"""Engine configuration: a frozen dataclass validated once, built by the CLI."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    token_budget: int = 2048  # max tokens (decodes + prefill chunks) packed into one step
    kv_cache_bytes: int | None = None  # None: a default share of free memory
    attention_backend: str = "torch"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.token_budget < 1:
            raise ValueError(f"token budget must be >= 1, got {self.token_budget}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"KV cache memory must be positive, got {self.kv_cache_bytes}")
