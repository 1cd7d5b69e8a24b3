"""How many KV blocks to allocate: from ``--kv-memory`` or a default share of free memory."""

from __future__ import annotations

import os

import torch

from batchrun.core.runner.kv_cache import KVCacheSpec
from batchrun.core.sizes import parse_memory  # noqa: F401 (moved; kept importable here)

DEFAULT_CPU_SHARE = 0.25  # of available RAM
DEFAULT_CPU_CAP = 8 * 2**30
DEFAULT_GPU_SHARE = 0.90  # of free device memory after the weights are loaded


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # plus what torch's allocator holds but does not use (an earlier engine's cache, say):
        # the driver counts it as taken, yet the new cache can reuse it
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_bytes(device: torch.device, budget: int | float | None) -> int:
    """Bytes for the KV cache: an absolute budget, a fraction of free memory, or the default."""
    if isinstance(budget, int):
        return budget
    free = free_memory(device)
    if budget is not None:
        return int(free * budget)
    if device.type == "cuda":
        return int(free * DEFAULT_GPU_SHARE)
    return min(int(free * DEFAULT_CPU_SHARE), DEFAULT_CPU_CAP)


def num_blocks_for(spec: KVCacheSpec, budget_bytes: int, useful_tokens: int | None = None) -> int:
    """Blocks that fit in ``budget_bytes``; never more than ``useful_tokens`` could ever use."""
    blocks = budget_bytes // spec.bytes_per_block
    if useful_tokens is not None:
        blocks = min(blocks, spec.blocks_for(useful_tokens))
    if blocks < 1:
        raise ValueError(
            f"the KV memory budget ({budget_bytes} bytes) holds no block of "
            f"{spec.bytes_per_block} bytes; raise --kv-memory"
        )
    return blocks
