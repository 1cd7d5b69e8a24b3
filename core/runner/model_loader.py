"""Load a checkpoint's weights for the engine, with batchrun's paged attention registered.

The folder was already checked and its config and tokenizer read (core/checkpoint.py);
this module only resolves device and dtype and loads the safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from batchrun.core.checkpoint import Checkpoint, open_checkpoint
from batchrun.core.errors import InputError
from batchrun.core.runner.attention_hook import register_attention


@dataclass
class LoadedModel:
    name: str  # the checkpoint folder's name, recorded in outputs
    path: Path
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    max_context: int  # positions the model supports (prompt + output)
    dtype_choice: str = ""  # why this dtype (for the log and the report)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` natively (AMX or AVX-512 bf16 / AMX fp16)."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return torch.cpu._is_amx_fp16_supported()
    return dtype == torch.float32


def resolve_dtype(
    name: str, device: torch.device, checkpoint_dtype: torch.dtype | None = None
) -> torch.dtype:
    return choose_dtype(name, device, checkpoint_dtype)[0]


def choose_dtype(
    name: str, device: torch.device, checkpoint_dtype: torch.dtype | None = None
) -> tuple[torch.dtype, str]:
    """The dtype for weights and KV, and why. ``auto`` follows the checkpoint, as transformers
    and vLLM do: its own dtype, except float32 on a GPU (bfloat16, or float16 where the GPU
    lacks bfloat16) and a half-precision checkpoint on a CPU without fast arithmetic for it
    (float32)."""
    if name != "auto":
        return DTYPES[name], f"--dtype {name}"
    stored = checkpoint_dtype if checkpoint_dtype in DTYPES.values() else torch.float32
    label = str(stored).removeprefix("torch.")
    if device.type == "cuda":
        if stored != torch.float32:
            return stored, f"auto: the checkpoint's {label}"
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return half, f"auto: a float32 checkpoint runs in {str(half).removeprefix('torch.')} on the GPU"
    if stored == torch.float32 or cpu_has_fast(stored):
        return stored, f"auto: the checkpoint's {label}"
    return torch.float32, f"auto: the checkpoint is {label} but this CPU has no fast {label}, so float32"


def load_model(checkpoint: Checkpoint | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load the weights of ``checkpoint`` (a path is opened first) onto ``device``."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint)
    torch_device = resolve_device(device)
    torch_dtype, dtype_choice = choose_dtype(
        dtype, torch_device, getattr(checkpoint.text_config, "dtype", None)
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint.path,
            config=checkpoint.config,
            local_files_only=True,
            dtype=torch_dtype,
            attn_implementation=register_attention(),
        )
    except OSError as exc:
        raise InputError(f"{checkpoint.path}: the weights could not be loaded ({exc})") from None
    model.to(torch_device).eval()
    return LoadedModel(
        name=checkpoint.name,
        path=checkpoint.path,
        model=model,
        tokenizer=checkpoint.tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        eos_token_ids=eos_token_ids(model, checkpoint.tokenizer),
        max_context=checkpoint.max_context,
        dtype_choice=dtype_choice,
    )


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Every id that ends generation: the generation config's, the model config's, the tokenizer's."""
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return tuple(sorted(ids))
