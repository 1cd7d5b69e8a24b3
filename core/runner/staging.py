"""A step's NumPy arrays onto the device, through pinned host buffers that live across steps.

On CUDA every step copies a handful of small arrays (token ids, positions, slot mapping,
block tables, ...) host to device. Pinning fresh memory for each would cost more than the
copies; these buffers are pinned once, grown when a step needs more, and handed out in call
order (the runner asks for the same arrays in the same order every step). A buffer is
reused only from the next step on, and only once the copies out of it have run: each copy is
followed by an event, and a new step waits for the last one. (Most steps already end in a
sync — the sampled ids come back to the host — but a step that samples nothing, a prefill
chunk, does not; nor does a CUDA graph's replay hold the CPU back.) On the CPU the arrays are
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
        # recorded after every copy out of a pinned buffer: once it has passed, all have run
        self._copied = torch.cuda.Event() if self.pin_memory and device.type == "cuda" else None

    def new_step(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copies have read their buffers
        self._next = 0

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        if not self.staged:
            return torch.from_numpy(array)
        staged = self._buffer(torch.from_numpy(array[:0]).dtype, array.size)[: array.size]
        staged.numpy()[:] = array.reshape(-1)
        copy = staged.view(array.shape).to(self.device, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return copy

    def _buffer(self, dtype: torch.dtype, size: int) -> torch.Tensor:
        i, self._next = self._next, self._next + 1
        if i == len(self._buffers):
            self._buffers.append(torch.empty(0, dtype=dtype))
        buffer = self._buffers[i]
        if buffer.dtype != dtype or buffer.numel() < size:
            capacity = max(size, 2 * buffer.numel(), 64)
            buffer = self._buffers[i] = torch.empty(capacity, dtype=dtype, pin_memory=self.pin_memory)
        return buffer
