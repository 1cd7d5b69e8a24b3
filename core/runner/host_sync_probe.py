"""Finds the ops in a forward pass that make the device wait for the host, or the host for the
device: what a CUDA graph cannot capture.

A CUDA graph records launches without running them, so an op that needs a device value on
the host mid-pass (``.item()``, ``nonzero``, boolean-mask indexing: their output size or value
decides what Python does next) or a copy between host and device breaks the capture. Run a
pass under ``HostSyncProbe`` (a torch dispatch mode: it sees every aten op, the model's and
batchrun's) and ``seen`` names each such op. Triton launches are not aten ops and never sync.

Not seen: ``torch.tensor(data, device="cuda")`` (no aten copy shows) and syncs inside custom
ops. The probe is a first check, not a proof; a capture that still fails is caught and the
run goes on eagerly.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops whose output size or value the host must read before it can go on (``.item()`` is
# aten.item under inference mode, aten._local_scalar_dense outside it)
_READS_DEVICE = {
    aten.item,
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.is_nonzero,
    aten.equal,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.bincount,
}
_COPIES = {aten.to, aten._to_copy, aten.copy_}  # aten.to under inference mode
_INDEXING = {aten.index, aten.index_put, aten.index_put_}


class HostSyncProbe(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []  # each syncing op, in order: "aten.nonzero.default", ...

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _syncs(func, args, kwargs, out):
            self.seen.append(str(func))
        return out


def _syncs(func, args: tuple, kwargs: dict, out) -> bool:
    packet = func.overloadpacket
    if packet in _READS_DEVICE:
        return True
    if packet in _INDEXING:  # a boolean mask is a nonzero in disguise; a host index, a copy
        indices = [i for i in args[1] if isinstance(i, torch.Tensor)]
        return any(i.dtype == torch.bool or i.device != args[0].device for i in indices)
    if func is aten.repeat_interleave.self_Tensor or func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None  # the output size is the repeats' sum
    if packet in _COPIES:  # between host and device, either way (copy_: dst, src; to: self)
        devices = {t.device.type for t in (*args[:2], out) if isinstance(t, torch.Tensor)}
        return "cpu" in devices and len(devices) > 1
    return False
