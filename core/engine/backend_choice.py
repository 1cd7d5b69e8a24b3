"""Which attention backend runs the model, and why (logged, and kept in the run report).

``auto`` prefers the device's fast backend — Triton on CUDA, the compiled in-place kernel on
CPU — when it can run here and supports the model, else the torch reference, which runs
everything. A backend named with ``--attention-backend`` (or handed over built, through the
Python API) must run the model, or the job stops before any work saying why. The flash
backend is never auto's choice: it is unmeasured on a GPU, and on a torch whose
``varlen_attn`` cannot read the paged cache in place it gathers copies.
"""

from __future__ import annotations

from batchrun.core.engine.config import EngineConfig
from batchrun.core.errors import InputError
from batchrun.core.runner.kv_cache import KVCacheSpec
from batchrun.core.runner.model_loader import LoadedModel
from batchrun.kernels import AttentionBackend, BackendUnavailable, get_backend

PREFERRED = {"cuda": "triton", "cpu": "cpu"}  # device type -> its fast backend
DESCRIPTION = {"triton": "Triton kernels on CUDA", "cpu": "the in-place CPU kernel"}


def choose_backend(
    config: EngineConfig, loaded: LoadedModel, spec: KVCacheSpec, given: AttentionBackend | None = None
) -> tuple[AttentionBackend, str]:
    """The attention backend for this model and device, and why it was chosen; ``given``, a
    backend built by the caller, is checked and taken instead of ``config``'s name."""
    text = loaded.model.config.get_text_config()
    needs = dict(
        device=loaded.device,
        dtype=loaded.dtype,
        block_size=config.block_size,
        softcap=bool(getattr(text, "attn_logit_softcapping", None)),
        sliding_window=bool(getattr(text, "sliding_window", None)),
        head_dim=spec.head_dim,
        gqa_group=text.num_attention_heads // spec.num_kv_heads,
    )
    options = {"cascade_min_saved_tokens": config.cascade_min_saved_tokens}
    if given is not None or config.attention_backend != "auto":
        try:
            backend = given if given is not None else get_backend(config.attention_backend, **options)
        except BackendUnavailable as exc:
            raise InputError(_refused(config.attention_backend, str(exc))) from exc
        reason = backend.capabilities.unsupported(**needs)
        if reason is not None:
            raise InputError(_refused(backend.name, reason))
        why = "given by the caller" if given is not None else "chosen with --attention-backend"
        if not backend.capabilities.in_place:
            why += " (it gathers copies of the blocks: it does not read the paged KV cache in place)"
        return backend, why
    device = loaded.device.type
    preferred = PREFERRED.get(device)
    if preferred is None:
        return get_backend("torch", **options), f"auto: the torch reference on {device}"
    try:
        backend = get_backend(preferred, **options)
    except BackendUnavailable as exc:
        why = f"{preferred} {exc}"
    else:
        reason = backend.capabilities.unsupported(**needs)
        if reason is None:
            return backend, f"auto: {DESCRIPTION[preferred]} (supports the model)"
        why = f"{preferred} {reason}"
    return get_backend("torch", **options), f"auto: {why}, so the torch reference"


def _refused(name: str, reason: str) -> str:
    return f"attention backend {name!r} {reason}; choose another with --attention-backend"
