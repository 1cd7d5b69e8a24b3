"""Attention backends, registered by name and imported lazily.

``get_backend("torch")`` always works; GPU backends import their libraries inside the
factory, so a machine without Triton or flash-attn never imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from batchrun.kernels.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "available_backends", "get_backend"]


class AttentionBackend(NamedTuple):
    name: str
    write_kv: Callable[..., None]  # (key, value, k_cache, v_cache, slot_mapping)
    paged_attention: Callable[..., object]  # (query, k_cache, v_cache, meta, scale, ...)


def _torch_backend() -> AttentionBackend:
    from batchrun.kernels import torch_ref

    return AttentionBackend("torch", torch_ref.write_kv, torch_ref.paged_attention)


_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {"torch": _torch_backend}


def available_backends() -> list[str]:
    return sorted(_FACTORIES)


def get_backend(name: str) -> AttentionBackend:
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(available_backends())}"
        ) from None
    return factory()
