"""The attention-backend interface: what a backend declares, plans once per step, and runs
per layer.

Following FlashInfer's ``plan()`` / ``run()`` and vLLM's ``AttentionMetadataBuilder``, a
backend turns the step's ``AttentionMetadata`` into its own step state once (index tensors,
the shared-prefix groups it will read once, split decisions), and every layer then calls
``write_kv`` and ``forward`` with that state and no further planning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from batchrun.kernels.metadata import AttentionMetadata


class BackendUnavailable(RuntimeError):
    """A backend cannot run on this machine at all (a library missing, a kernel that does
    not build); the message says why."""


@dataclass(frozen=True)
class BackendCapabilities:
    devices: frozenset[str]  # torch device types, e.g. {"cpu", "cuda"}
    dtypes: frozenset[torch.dtype]
    block_size_multiple: int = 1  # supported block sizes are multiples of this ...
    max_block_size: int | None = None  # ... up to this (None: any)
    head_dims: frozenset[int] | None = None  # None: any
    max_gqa_group: int | None = None  # query heads per kv head (None: any)
    softcap: bool = True  # Gemma 2 style tanh soft-capping of scores
    sliding_window: bool = True
    shared_prefix: bool = False  # reads a first-level group's prefix once for all its members
    in_place: bool = True  # reads the paged KV cache through the block tables (False: gathers copies)
    cuda_graphs: bool = False  # honours AttentionMetadata.static_shapes and has graph_inputs

    def unsupported(
        self,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        softcap: bool = False,
        sliding_window: bool = False,
        head_dim: int | None = None,
        gqa_group: int | None = None,
    ) -> str | None:
        """Why this backend cannot run the configuration, or None if it can."""
        if device.type not in self.devices:
            return f"runs on {', '.join(sorted(self.devices))}, not {device.type}"
        if dtype not in self.dtypes:
            return f"does not support {dtype}"
        if block_size % self.block_size_multiple or (
            self.max_block_size and block_size > self.max_block_size
        ):
            limit = f" up to {self.max_block_size}" if self.max_block_size else ""
            multiple = self.block_size_multiple
            return f"needs a block size that is a multiple of {multiple}{limit}, not {block_size}"
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            return f"supports head dims {sorted(self.head_dims)}, not {head_dim}"
        if gqa_group is not None and self.max_gqa_group is not None and gqa_group > self.max_gqa_group:
            return f"supports up to {self.max_gqa_group} query heads per kv head, not {gqa_group}"
        if softcap and not self.softcap:
            return "cannot soft-cap attention scores (this model soft-caps)"
        if sliding_window and not self.sliding_window:
            return "has no sliding-window attention (this model uses it)"
        return None


@dataclass(frozen=True)
class GraphInputs:
    """What lets a CUDA graph captured for one step replay another of the same padded shape."""

    key: tuple  # host values the launches bake in (tile sizes, split counts): equal keys, same kernels
    tensors: tuple[torch.Tensor, ...]  # every device tensor of the state the launches read


class AttentionBackend(ABC):
    name: str
    capabilities: BackendCapabilities

    @abstractmethod
    def build(self, metadata: AttentionMetadata) -> Any:
        """Plan one step, once, before the first layer; returns the state every layer's
        ``write_kv`` / ``forward`` receives."""

    @abstractmethod
    def write_kv(
        self,
        state: Any,
        key: torch.Tensor,  # (T, Hkv, D)
        value: torch.Tensor,  # (T, Hkv, D)
        k_cache: torch.Tensor,  # (num_blocks + 1, block_size, Hkv, D)
        v_cache: torch.Tensor,
    ) -> None:
        """Store the step's new keys and values at their cache slots."""

    @abstractmethod
    def forward(
        self,
        state: Any,
        query: torch.Tensor,  # (T, Hq, D)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        softcap: float | None = None,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Causal attention of each sequence's new queries over its cached keys; (T, Hq, D)."""

    def graph_inputs(self, state: Any) -> GraphInputs:
        """For a state built from ``static_shapes`` metadata: the key a CUDA graph of it is
        stored under, and the tensors a replay refreshes (backends with ``cuda_graphs``)."""
        raise NotImplementedError(f"attention backend {self.name!r} does not run in CUDA graphs")
