"""Attention backends, registered by name and imported lazily.

``get_backend("torch")`` always works; GPU backends import their libraries inside the
factory, so a machine without Triton never imports it (nor the flash backend's
``torch.nn.attention.varlen`` until asked for). Every backend implements
``AttentionBackend`` (backend.py).
"""

from __future__ import annotations

from collections.abc import Callable

from batchrun.kernels.backend import (
    AttentionBackend,
    BackendCapabilities,
    BackendUnavailable,
    GraphInputs,
)
from batchrun.kernels.metadata import AttentionMetadata

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "BackendCapabilities",
    "BackendUnavailable",
    "GraphInputs",
    "available_backends",
    "get_backend",
]


def _torch_backend(cascade_min_saved_tokens: int | None = None, **_) -> AttentionBackend:
    from batchrun.kernels.torch_ref import TorchBackend

    if cascade_min_saved_tokens is None:
        return TorchBackend()
    return TorchBackend(cascade_min_saved_tokens)


def _triton_backend(cascade_min_saved_tokens: int | None = None, **_) -> AttentionBackend:
    try:
        from batchrun.kernels.triton_backend import TritonBackend  # imports triton
    except ImportError as exc:
        raise BackendUnavailable(f"needs Triton ({exc}); pip install 'batchrun[gpu]'") from exc

    if cascade_min_saved_tokens is None:
        return TritonBackend()
    return TritonBackend(cascade_min_saved_tokens)


def _flash_backend(cascade_min_saved_tokens: int | None = None, kernel=None, **_) -> AttentionBackend:
    try:
        from batchrun.kernels.flash_backend import FlashBackend  # imports torch.nn.attention.varlen
    except ImportError as exc:
        import torch

        raise BackendUnavailable(
            f"needs torch.nn.attention.varlen, which torch {torch.__version__} lacks ({exc})"
        ) from exc

    if cascade_min_saved_tokens is None:
        return FlashBackend(kernel=kernel)
    return FlashBackend(cascade_min_saved_tokens, kernel=kernel)


def _cpu_backend(cascade_min_saved_tokens: int | None = None, **_) -> AttentionBackend:
    from batchrun.kernels.cpu_backend import CpuBackend  # builds the kernel on first use

    if cascade_min_saved_tokens is None:
        return CpuBackend()
    return CpuBackend(cascade_min_saved_tokens)


_FACTORIES: dict[str, Callable[..., AttentionBackend]] = {
    "cpu": _cpu_backend,
    "flash": _flash_backend,
    "torch": _torch_backend,
    "triton": _triton_backend,
}


def available_backends() -> list[str]:
    return sorted(_FACTORIES)


def get_backend(name: str, **options) -> AttentionBackend:
    """The backend registered as ``name``, built with its ``options`` (e.g.
    ``cascade_min_saved_tokens``; the flash backend's ``kernel``, a ``VarlenKernel``);
    ``BackendUnavailable`` if it cannot run here."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(available_backends())}"
        ) from None
    return factory(**options)
