"""torch's own FlashAttention entry point, ``torch.nn.attention.varlen.varlen_attn``, and what
this torch's version of it can do.

The flash backend takes the function as a ``VarlenKernel`` argument, so the tests run the
backend on CPU through a pure-torch implementation of the same contract
(tests/varlen_reference.py); ``torch_varlen()`` is the real one. Importing this module
imports ``torch.nn.attention.varlen``; where an older torch lacks it, the registry says so
(``BackendUnavailable``).

Versions differ in what the function accepts, so its features are read from its signature
once: torch 2.11 takes ``(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux,
scale, window_size)``; torch 2.12 and later add ``enable_gqa``, ``seqused_k`` +
``block_table`` (read a paged KV pool in place) and ``num_splits`` (1: batch-invariant).

Facts the backend relies on, and where they come from:

* the LSE is natural log, laid out ``(Hq, Tq)`` — ATen's ``mha_varlen_fwd``
  (aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp allocates
  ``softmax_lse`` as ``{num_heads, total_q}``), and torch's own fake and meta registrations
  (torch/nn/attention/varlen.py, torch/_meta_registrations.py) say the same; varlen_attn's
  docstring says ``(T_q, H_q)`` but the wrapper passes the kernel's tensor through. The
  decode path that swaps query heads into the sequence dimension reshapes its LSE back to
  ``(Hq, Tq)`` too.
* a paged pool's page size must be a multiple of 256 — the same file's
  ``TORCH_CHECK(!paged_KV || page_block_size % 256 == 0, ...)``, FlashAttention 2's limit
  (Dao-AILab/flash-attention#828; FlashAttention 3 has none, but torch runs its bundled
  FlashAttention 2 unless another implementation is registered).
* causal attention with fewer queries than keys is aligned bottom-right (FlashAttention >=
  2.1): query ``i`` of ``Lq`` sits at key position ``i + Lk - Lq``; ``window_size=(L, R)``
  lets it see keys ``pos - L .. pos + R`` (-1: unbounded), so ``(-1, 0)`` is causal.
* head dims: multiples of 8 up to 256 (``head_size must be a multiple of 8``, ``at most 256``);
  dtypes fp16 and bf16 only; CUDA only (on CPU the op raises NotImplementedError).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.nn.attention.varlen import AuxRequest, varlen_attn

from batchrun.kernels.backend import BackendUnavailable

FLASH_HEAD_DIMS = frozenset(range(8, 257, 8))
FLASH_PAGE_SIZE_MULTIPLE = 256  # FlashAttention 2's paged-KV limit, see above
LSE = AuxRequest(lse=True)  # return_aux asking for the log-sum-exp


class VarlenKernel(NamedTuple):
    """A ``varlen_attn`` implementation and where it runs."""

    attend: Callable[..., Any]  # varlen_attn's signature (some keywords may be missing)
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    page_size_multiple: int  # a paged pool's page size must be a multiple of this


class VarlenFeatures(NamedTuple):
    """Which optional keywords ``attend`` takes."""

    paged: bool  # block_table + seqused_k: keys read from the paged pool in place
    gqa: bool  # enable_gqa: fewer KV heads than query heads, without repeating them
    num_splits: bool  # num_splits=1: one reduction order whatever the batch

    @classmethod
    def of(cls, attend: Callable[..., Any]) -> VarlenFeatures:
        params = inspect.signature(attend).parameters
        missing = [p for p in ("return_aux", "scale", "window_size") if p not in params]
        if missing:
            raise BackendUnavailable(
                f"needs torch.nn.attention.varlen.varlen_attn with {', '.join(missing)} "
                f"(torch >= 2.11; this is torch {torch.__version__})"
            )
        return cls(
            paged="block_table" in params and "seqused_k" in params,
            gqa="enable_gqa" in params,
            num_splits="num_splits" in params,
        )


def torch_varlen() -> VarlenKernel:
    """torch's varlen_attn: FlashAttention's CUDA kernels, fp16 / bf16."""
    return VarlenKernel(
        attend=varlen_attn,
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        page_size_multiple=FLASH_PAGE_SIZE_MULTIPLE,
    )


def lse_rows(lse: torch.Tensor, num_rows: int, num_heads: int) -> torch.Tensor:
    """The kernel's ``(Hq, Tq)`` LSE as ``(Tq, Hq)`` (a view), the layout the merge reads."""
    if tuple(lse.shape) != (num_heads, num_rows):
        raise RuntimeError(
            f"varlen_attn returned an LSE of shape {tuple(lse.shape)}; expected "
            f"(heads, tokens) = ({num_heads}, {num_rows})"
        )
    return lse.t()
