"""Model layers that batchrun runs with its own kernels, during its steps and only then.

An override binds a replacement ``forward`` to one module instance for the duration of a
step (``with overrides:``) and removes it afterwards, so the model object stays exactly what
transformers built: a ``generate`` on the same model (the oracle tests do this) runs
transformers' own layers. Today the one override is the CPU's one-pass RMSNorm
(kernels/cpu/rms_norm.py), used with the compiled CPU backend.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType

import torch

from batchrun.kernels import BackendUnavailable


class LayerOverrides:
    def __init__(
        self, forwards: dict[torch.nn.Module, Callable] | None = None, description: str = ""
    ) -> None:
        self.forwards = forwards or {}
        self.description = description  # for the run's log line, e.g. "RMSNorm: ... in 17 layers"

    def __len__(self) -> int:
        return len(self.forwards)

    def __enter__(self) -> LayerOverrides:
        for module, forward in self.forwards.items():
            module.forward = MethodType(forward, module)  # an instance attribute shadows the class's
        return self

    def __exit__(self, *exc) -> None:
        for module in self.forwards:
            module.__dict__.pop("forward", None)


def cpu_layer_overrides(model: torch.nn.Module) -> LayerOverrides:
    """The one-pass RMSNorm for every Llama-style RMSNorm of ``model``; none where the CPU
    kernels cannot build (the attention backend then says why)."""
    try:
        from batchrun.kernels.cpu.rms_norm import fused_rms_norm_forward, rms_norm_layers

        layers = rms_norm_layers(model)
    except BackendUnavailable:
        return LayerOverrides()
    if not layers:
        return LayerOverrides()
    description = f"RMSNorm: the one-pass CPU kernel in {len(layers)} layers"
    return LayerOverrides(dict.fromkeys(layers, fused_rms_norm_forward), description)
