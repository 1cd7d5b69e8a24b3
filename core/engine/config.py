"""Engine configuration: a frozen dataclass validated once, built by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, replace

from batchrun.core.sched.config import SchedulerConfig

# Tokens per step by device type when the job names none. On CPU, 2,048 keeps a step's
# activations in cache and the linear layers at the matmul's rate (README, Benchmarks). On
# CUDA, an H200 runs a 7B Llama's layers at 60-62% of its bf16 matmul rate for one packed
# forward of 1,024-4,096 tokens, 25% at 256 and 51% at 16,384 (measured for issue 12), so a
# step should carry thousands of tokens: 4,096.
DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "cuda": 4096}


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    # max tokens (decodes + prefill chunks) packed into one step; None: the device's default
    token_budget: int | None = None
    # KV cache size: bytes (int), a fraction of free memory (float in (0, 1]), or None for
    # the default share (see runner/kv_budget.py).
    kv_cache_bytes: int | float | None = None
    attention_backend: str = "auto"  # or a name from kernels.available_backends()
    reserve_full: bool = False  # reserve every request's whole max_tokens at admission (no preemption)
    # Admission policy knobs (the token budget and reservation above override its own).
    scheduler: SchedulerConfig = SchedulerConfig()
    # Read a group's prefix once when that spares this many prefix-token reads (None: the
    # backend's own default, 2,048 for torch on CPU, 1 for Triton).
    cascade_min_saved_tokens: int | None = None
    # Replay steps of up to 512 tokens from CUDA graphs (runner/cuda_graphs.py), on CUDA with
    # a backend that runs in them (Triton); elsewhere this changes nothing.
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token budget must be >= 1, got {self.token_budget}")
        kv = self.kv_cache_bytes
        if kv is not None and (kv <= 0 or (isinstance(kv, float) and kv > 1)):
            raise ValueError(f"KV cache memory must be bytes > 0 or a fraction in (0, 1], got {kv}")

    def for_device(self, device_type: str) -> EngineConfig:
        """This config with the token budget resolved for ``device_type``."""
        if self.token_budget is not None:
            return self
        return replace(self, token_budget=DEFAULT_TOKEN_BUDGET.get(device_type, DEFAULT_TOKEN_BUDGET["cpu"]))

    def scheduler_config(self) -> SchedulerConfig:
        assert self.token_budget is not None, "resolve the token budget with for_device() first"
        return replace(self.scheduler, token_budget=self.token_budget, reserve_full=self.reserve_full)
