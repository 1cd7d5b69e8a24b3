"""A step's NumPy arrays onto the device, through pinned host buffers that live across steps.

On CUDA every step copies a handful of small arrays (token ids, positions, slot mapping,
block tables, ...) host to device. Pinning fresh memory for each would cost more than the
copies; these buffers are pinned once, grown when a step needs more, and handed out in call
order (the runner asks for the same arrays in the same order every step). A buffer is
reused only from the next step on, and every step ends with the sampled ids coming back to
the host, a sync point: no copy of an earlier step still reads it. On the CPU the arrays are
wrapped as tensors, not copied.
"""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    def __init__(self, device: torch.device, pin_memory: bool | None = None) -> None:
        self.device = device
        self.staged = device.type == "cuda" if pin_memory is None else True
        self.pin_memory = device.type == "cuda" if pin_memory is None else pin_memory
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def new_step(self) -> None:
        self._next = 0

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        if not self.staged:
            return torch.from_numpy(array)
        staged = self._buffer(torch.from_numpy(array[:0]).dtype, array.size)[: array.size]
        staged.numpy()[:] = array.reshape(-1)
        return staged.view(array.shape).to(self.device, non_blocking=True)

    def _buffer(self, dtype: torch.dtype, size: int) -> torch.Tensor:
        i, self._next = self._next, self._next + 1
        if i == len(self._buffers):
            self._buffers.append(torch.empty(0, dtype=dtype))
        buffer = self._buffers[i]
        if buffer.dtype != dtype or buffer.numel() < size:
            capacity = max(size, 2 * buffer.numel(), 64)
            buffer = self._buffers[i] = torch.empty(capacity, dtype=dtype, pin_memory=self.pin_memory)
        return buffer
