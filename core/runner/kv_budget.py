"""How many KV blocks to allocate: from ``--kv-memory`` or a default share of free memory."""

from __future__ import annotations

import os
import re

import torch

from batchrun.core.runner.kv_cache import KVCacheSpec

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
DEFAULT_CPU_SHARE = 0.25  # of available RAM
DEFAULT_CPU_CAP = 8 * 2**30
DEFAULT_GPU_SHARE = 0.90  # of free device memory after the weights are loaded


def parse_memory(text: str) -> int | float:
    """``"8GiB"`` -> bytes (int); ``"0.5"`` -> a fraction of free memory (float in (0, 1])."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}; use e.g. 8GiB, 512MB or 0.5 (a fraction)")
    number, unit = float(match.group(1)), match.group(2).upper()
    if not unit and number <= 1.0:
        if number <= 0:
            raise ValueError(f"memory fraction must be in (0, 1], got {text!r}")
        return number
    return int(number * _UNITS[unit])


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
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
