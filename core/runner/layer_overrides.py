"""Model layers that batchrun runs with its own kernels, during its steps and only then.

An override binds a replacement ``forward`` to one module instance, or replaces a function
of a modeling module (e.g. ``modeling_llama.apply_rotary_pos_emb``), for the duration of a
step (``with overrides:``) and restores the original afterwards, so outside batchrun's
steps the model is exactly what transformers built. On CPU, with the compiled backend, the
overrides are the one-pass RMSNorm (kernels/cpu/rms_norm.py), rotary embedding
(kernels/cpu/rotary.py) and gated MLP (kernels/cpu/gated_mlp.py), each only where the
layer's code is Llama's. (The gated MLP's half-precision gate and up weights are stored as
one tensor that the two parameters view: the model computes what it did, from the same
memory.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import MethodType, ModuleType

import torch

from batchrun.kernels import BackendUnavailable


class LayerOverrides:
    def __init__(
        self,
        forwards: dict[torch.nn.Module, Callable] | None = None,
        functions: dict[ModuleType, dict[str, Callable]] | None = None,
        description: str = "",
    ) -> None:
        self.forwards = forwards or {}  # module instance -> its forward during steps
        self.functions = functions or {}  # modeling module -> {name: function during steps}
        self.description = description  # for the run's log line
        self._saved: list[tuple[ModuleType, str, Callable]] = []

    def __len__(self) -> int:
        return len(self.forwards) + sum(map(len, self.functions.values()))

    def __enter__(self) -> LayerOverrides:
        for module, forward in self.forwards.items():
            module.forward = MethodType(forward, module)  # an instance attribute shadows the class's
        for namespace, replacements in self.functions.items():
            for name, function in replacements.items():
                self._saved.append((namespace, name, getattr(namespace, name)))
                setattr(namespace, name, function)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.forwards:
            module.__dict__.pop("forward", None)
        while self._saved:
            namespace, name, original = self._saved.pop()
            setattr(namespace, name, original)


def cpu_layer_overrides(model: torch.nn.Module) -> LayerOverrides:
    """The one-pass RMSNorm, rotary embedding and gated MLP wherever ``model``'s layers are
    Llama's; none where the CPU kernels cannot build (the attention backend then says why)."""
    try:
        from batchrun.kernels.cpu.gated_mlp import fused_gate_up, gated_mlp_forward, gated_mlp_layers
        from batchrun.kernels.cpu.rms_norm import fused_rms_norm_forward, rms_norm_layers
        from batchrun.kernels.cpu.rotary import fused_apply_rotary_pos_emb, rotary_functions

        norms, rotaries, mlps = rms_norm_layers(model), rotary_functions(model), gated_mlp_layers(model)
    except BackendUnavailable:
        return LayerOverrides()
    forwards: dict[torch.nn.Module, Callable] = dict.fromkeys(norms, fused_rms_norm_forward)
    for mlp in mlps:
        forwards[mlp] = functools.partial(gated_mlp_forward, gate_up=fused_gate_up(mlp))
    done = [f"RMSNorm in {len(norms)} layers"] if norms else []
    done += ["rotary embedding"] if rotaries else []
    done += [f"the gated MLP in {len(mlps)} layers"] if mlps else []
    return LayerOverrides(
        forwards,
        {module: {"apply_rotary_pos_emb": fused_apply_rotary_pos_emb} for module in rotaries},
        f"one-pass CPU kernels for {', '.join(done)}" if done else "",
    )
