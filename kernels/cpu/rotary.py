"""Rotary position embedding on the CPU in one pass (rotary.cpp), for the models whose
``apply_rotary_pos_emb`` is Llama's.

transformers' ``apply_rotary_pos_emb`` runs about ten torch operators over the step's
queries and keys. ``rotary_functions`` finds the modeling modules of ``model``'s attention
layers whose module-level ``apply_rotary_pos_emb`` is *that* function (the same bytecode,
names and constants as Llama's), and ``fused_apply_rotary_pos_emb`` is what they call
instead during batchrun's steps (core/runner/layer_overrides.py). It rounds as the torch
operators do, and returns queries and keys laid out (tokens, heads, dim) — the layout the
attention hook reads, so the hook's transpose is free.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from types import ModuleType

import torch
from transformers.models.llama import modeling_llama

from batchrun.kernels.cpu.build import DTYPE_CODES, load
from batchrun.kernels.cpu.rms_norm import code_key

_REFERENCE = modeling_llama.apply_rotary_pos_emb


@functools.cache
def _entry():
    entry = load().batchrun_rotary
    entry.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int32]
    entry.restype = ctypes.c_int
    return entry


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (1, heads, T, D) with unit stride in D and a token stride; cos, sin (1, T, D)
    contiguous, of x's dtype. Returns the rotated x, shape (1, heads, T, D), stored (T, heads, D)."""
    _, heads, tokens, dim = x.shape
    out = torch.empty((tokens, heads, dim), dtype=x.dtype)
    status = _entry()(
        x.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        out.data_ptr(),
        tokens,
        heads,
        dim,
        x.stride(2),
        x.stride(1),
        DTYPE_CODES[x.dtype],
    )
    if status != 0:
        raise RuntimeError(f"CPU rotary embedding rejected dtype {x.dtype} / head dim {dim}")
    return out.transpose(0, 1).unsqueeze(0)


def _covered(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[0] == 1  # batchrun's steps: every token packed into one batch row
        and x.dtype in DTYPE_CODES
        and cos.dtype == sin.dtype == x.dtype
        and x.stride(-1) == 1
        and x.shape[-1] % 2 == 0
        and cos.shape == sin.shape == (1, x.shape[2], x.shape[3])
        and cos.is_contiguous()
        and sin.is_contiguous()
    )


def fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Llama's ``apply_rotary_pos_emb`` through the kernel, where it covers the call."""
    if unsqueeze_dim != 1 or not (_covered(q, cos, sin) and _covered(k, cos, sin)):
        return _REFERENCE(q, k, cos, sin, unsqueeze_dim)
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotary_functions(model: torch.nn.Module) -> list[ModuleType]:
    """The modeling modules whose ``apply_rotary_pos_emb`` is Llama's and whose attention
    layers ``model`` has (building or loading the kernel first)."""
    _entry()
    reference = code_key(_REFERENCE)
    found = []
    for layer in model.modules():
        module = sys.modules.get(type(layer).__module__)
        function = getattr(module, "apply_rotary_pos_emb", None)
        if module in found or not hasattr(function, "__code__") or not hasattr(layer, "q_proj"):
            continue
        if code_key(function) == reference:
            found.append(module)
    return found
