"""The gated MLP on the CPU: one product for the gate and up projections, and SiLU times up
in one pass (silu_mul.cpp), for the models' layers whose code is Llama's MLP.

transformers' ``LlamaMLP.forward`` is ``down(silu(gate(x)) * up(x))``: two products over the
same input, then two element-wise passes over the step's (tokens, intermediate) activations.
``gated_mlp_layers`` finds every layer whose ``forward`` is that computation (the same
bytecode, names and constants as ``LlamaMLP.forward``: Qwen2's and Mistral's copies qualify)
with SiLU as its activation and no biases, and ``gated_mlp_forward`` is what it runs during
batchrun's steps (core/runner/layer_overrides.py).

In bf16 and fp16 the gate and up weights are stored as the two halves of one (2I, H) tensor —
the layers' parameters become views of it, so the model still computes what it did and holds
no copy — and one matrix product gives both (oneDNN's results for each half are the same bits
as its separate products: checked on this project's shapes). In float32 the two products stay
separate, as the oracle compares with transformers bit for bit where it can.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaMLP

from batchrun.kernels.cpu.build import DTYPE_CODES, load
from batchrun.kernels.cpu.rms_norm import code_key


@functools.cache
def _entry():
    entry = load().batchrun_silu_mul
    entry.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int32]
    entry.restype = ctypes.c_int
    return entry


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` rounded as the two torch operators round; gate and up (..., I)
    of one dtype with unit stride along I and one row stride each (halves of one tensor do)."""
    width = gate.shape[-1]
    g, u = gate.reshape(-1, width), up.reshape(-1, width)  # views for packed (1, T, I) steps
    out = torch.empty(gate.shape, dtype=gate.dtype)
    status = _entry()(
        g.data_ptr(),
        u.data_ptr(),
        out.data_ptr(),
        g.shape[0],
        width,
        g.stride(0),
        u.stride(0),
        DTYPE_CODES[gate.dtype],
    )
    if status != 0:
        raise RuntimeError(f"CPU SiLU-and-multiply rejected dtype {gate.dtype}")
    return out


def gated_mlp_forward(self, x: torch.Tensor, gate_up: torch.Tensor | None = None) -> torch.Tensor:
    """A matching layer's forward through the kernel (bound to the layer); ``gate_up`` is its
    fused (2I, H) weight in half precision, None in float32."""
    if x.device.type != "cpu" or x.dtype not in DTYPE_CODES or x.dtype != self.down_proj.weight.dtype:
        return type(self).forward(self, x)  # what the kernel does not cover: the layer's own code
    if gate_up is not None:
        both = F.linear(x, gate_up)
        gate, up = both.split(gate_up.shape[0] // 2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(silu_mul(gate, up))


def gated_mlp_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model``'s Llama-style MLP layers with SiLU and no biases (building or loading the
    kernel first, so a machine that cannot build it raises ``KernelUnavailable`` here)."""
    _entry()
    reference = code_key(LlamaMLP.forward)
    found = []
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        if not hasattr(forward, "__code__") or code_key(forward) != reference:
            continue
        projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        act = getattr(module, "act_fn", None)
        if all(isinstance(p, torch.nn.Linear) and p.bias is None for p in projections) and _is_silu(act):
            found.append(module)
    return found


def fused_gate_up(layer: torch.nn.Module) -> torch.Tensor | None:
    """The layer's gate and up weights as one (2I, H) tensor whose halves the two parameters
    now view (half precision only; None in float32, where they stay as they are)."""
    gate, up = layer.gate_proj.weight, layer.up_proj.weight
    if gate.dtype not in (torch.bfloat16, torch.float16) or gate.shape != up.shape:
        return None
    both = torch.cat([gate.detach(), up.detach()])
    half = gate.shape[0]
    with torch.no_grad():
        layer.gate_proj.weight = torch.nn.Parameter(both[:half], requires_grad=False)
        layer.up_proj.weight = torch.nn.Parameter(both[half:], requires_grad=False)
    return both


def _is_silu(act) -> bool:
    return (
        isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    )  # transformers' ACT2FN["silu"]
