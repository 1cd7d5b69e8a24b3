"""Finds the ops in a forward pass that make the device wait for the host, or the host for the
device: what a CUDA graph cannot capture.

A CUDA graph records launches without running them, so an op that needs a device value on
the host mid-pass (``.item()``, ``nonzero``, boolean-mask indexing: their output size or value
decides what Python does next) or a copy between host and device breaks the capture. Run a
pass under ``HostSyncProbe`` (a torch dispatch mode: it sees every aten op, the model's and
batchrun's) and ``seen`` names each such op. Triton launches are not aten ops and never sync.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops whose result the host must read before it can go on (``.item()`` is aten.item under
# inference mode, aten._local_scalar_dense outside it)
_READS_DEVICE = {
    aten.item,
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.is_nonzero,
    aten.equal,
}
_COPIES = {aten._to_copy, aten.copy_}


class HostSyncProbe(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []  # each syncing op, in order: "aten.nonzero.default", ...

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _syncs(func.overloadpacket, args, out):
            self.seen.append(str(func))
        return out


def _syncs(packet, args: tuple, out) -> bool:
    if packet in _READS_DEVICE:
        return True
    if packet is aten.index:  # a boolean mask is a nonzero in disguise
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    if packet in _COPIES:  # between host and device, either way (copy_: dst, src; _to_copy: self)
        devices = {t.device.type for t in (*args[:2], out) if isinstance(t, torch.Tensor)}
        return "cpu" in devices and len(devices) > 1
    return False
