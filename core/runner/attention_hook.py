"""batchrun's attention function for transformers' attention-function interface.

The model's own layers run unchanged; at each attention call they hand us the step's
projected, rotary-embedded queries, keys and values. We write K/V into the paged cache
and attend over it with the selected kernel backend. Per-step state travels explicitly
as the ``batchrun_step`` keyword of the model's forward, never through module globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from batchrun.core.runner.kv_cache import KVCache
from batchrun.kernels import AttentionBackend

ATTENTION_NAME = "batchrun_paged"


@dataclass(frozen=True)
class StepContext:
    kv_cache: KVCache
    backend: AttentionBackend
    state: Any  # what backend.build returned for this step


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, Hq, T, D): the step's tokens packed into one "batch row"
    key: torch.Tensor,  # (1, Hkv, T, D)
    value: torch.Tensor,  # (1, Hkv, T, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    batchrun_step: StepContext | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    if batchrun_step is None:
        raise RuntimeError(
            f"attention '{ATTENTION_NAME}' needs the batchrun_step keyword; "
            "this model was loaded for batchrun's engine and cannot be called directly"
        )
    q = query[0].transpose(0, 1)  # (T, Hq, D)
    k = key[0].transpose(0, 1)  # (T, Hkv, D)
    v = value[0].transpose(0, 1)
    k_cache, v_cache = batchrun_step.kv_cache.layer(module.layer_idx)
    backend, state = batchrun_step.backend, batchrun_step.state
    backend.write_kv(state, k, v, k_cache, v_cache)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = backend.forward(state, q, k_cache, v_cache, scale, softcap=softcap, sliding_window=sliding_window)
    return out.unsqueeze(0), None  # (1, T, Hq, D), as transformers' own functions return


def register_attention() -> str:
    """Register the function with transformers (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
