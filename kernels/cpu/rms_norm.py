"""RMSNorm on the CPU in one pass per row (rms_norm.cpp), and the models' layers it replaces.

transformers' Llama-family ``*RMSNorm.forward`` runs four torch operators, each a full pass
over the step's activations; on a small model's CPU step that is a fifth of the time.
``rms_norm_layers`` finds every layer whose ``forward`` is *that* computation — the same
bytecode, names and constants as ``LlamaRMSNorm.forward``, so Qwen2's, Mistral's and the
other copies qualify and Gemma's ``(1 + weight)`` does not — and ``fused_rms_norm_forward``
is what they run instead during batchrun's steps (core/runner/layer_overrides.py). The
result rounds exactly as the torch operators do; only the order of the sum of squares
differs.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from batchrun.kernels.cpu.build import DTYPE_CODES, load


@functools.cache
def _entry():
    entry = load().batchrun_rms_norm
    entry.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_float,
        ctypes.c_int32,
    ]
    entry.restype = ctypes.c_int
    return entry


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps))`` over the last dim, rounded as the Llama
    layer rounds; x (..., H) with unit stride in H, weight (H,) of x's dtype."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)  # a view where the layout allows (e.g. (B, T, H) contiguous)
    out = torch.empty(x.shape, dtype=x.dtype)
    status = _entry()(
        rows.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        rows.shape[0],
        hidden,
        rows.stride(0),
        eps,
        DTYPE_CODES[x.dtype],
    )
    if status != 0:
        raise RuntimeError(f"CPU RMSNorm rejected dtype {x.dtype}")
    return out


def fused_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A matching layer's forward through the kernel (bound to the layer)."""
    x, weight = hidden_states, self.weight
    if x.device.type != "cpu" or x.dtype not in DTYPE_CODES or weight.dtype != x.dtype or x.stride(-1) != 1:
        return type(self).forward(self, x)  # what the kernel does not cover: the layer's own code
    return rms_norm(x, weight, self.variance_epsilon)


def code_key(function) -> tuple:
    """What makes two functions compute the same thing: bytecode, names, constants."""
    code = function.__code__
    return code.co_code, code.co_names, code.co_consts, code.co_varnames


def rms_norm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model``'s Llama-style RMSNorm layers (building or loading the kernel first, so a
    machine that cannot build it raises ``KernelUnavailable`` here)."""
    _entry()
    reference = code_key(LlamaRMSNorm.forward)
    found = []
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        if hasattr(forward, "__code__") and hasattr(module, "variance_epsilon"):
            if code_key(forward) == reference:
                found.append(module)
    return found
