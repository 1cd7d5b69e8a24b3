"""Load a local Hugging Face checkpoint (config, tokenizer, safetensors) for the engine.

Nothing is fetched from a hub: every load is ``local_files_only``. Problems a user can fix
(missing folder, no tokenizer, unsupported architecture) raise ``InputError`` saying what
to do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from batchrun.core.errors import InputError
from batchrun.core.runner.attention_hook import register_attention

# Decoder-only architectures whose tiny configs pass the oracle test (tests/test_architectures.py).
SUPPORTED_MODEL_TYPES = ("gemma2", "gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # float32 on CPU (exact, and the oracle's dtype); bfloat16 on GPUs that have it.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_model_folder(path: Path) -> str:
    """Fail fast, before any work, if ``path`` cannot be a supported checkpoint.
    Returns the model type."""
    if not path.is_dir():
        raise InputError(f"model folder {path} does not exist; pass --model PATH to a local checkpoint")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files of the checkpoint into the folder"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_file} is not valid JSON ({exc})") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{path}: model type {model_type!r} is not supported; "
            f"batchrun supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    check_model_folder(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: the tokenizer could not be loaded ({exc})") from None


def load_model(
    path: Path, device: str = "auto", dtype: str = "auto", tokenizer: PreTrainedTokenizerBase | None = None
) -> LoadedModel:
    tokenizer = tokenizer or load_tokenizer(path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch_dtype, attn_implementation=register_attention()
        )
    except OSError as exc:
        raise InputError(f"{path}: the weights could not be loaded ({exc})") from None
    model.to(torch_device).eval()
    return LoadedModel(
        name=path.name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        eos_token_ids=eos_token_ids(model, tokenizer),
        max_context=max_context_of(path),
    )


IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def model_identity(path: Path) -> str:
    """A fingerprint of what a checkpoint generates: its config, generation config and
    tokenizer files, and the names and sizes of its weight files (hashing gigabytes of
    weights would cost minutes; a changed fine-tune changes sizes or config in practice)."""
    h = hashlib.blake2b(digest_size=8)
    for name in IDENTITY_FILES:
        file = path / name
        if file.is_file():
            h.update(name.encode() + b"\x00" + file.read_bytes())
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{file.name}\x00{file.stat().st_size}".encode())
    return f"{path.name}:{h.hexdigest()}"


def max_context_of(path: Path) -> int:
    """Positions the model supports (prompt + output), from its config."""
    config = AutoConfig.from_pretrained(path, local_files_only=True).get_text_config()
    return config.max_position_embeddings


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Every id that ends generation: the generation config's, the model config's, the tokenizer's."""
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return tuple(sorted(ids))


def model_sampling_defaults(path: Path) -> dict[str, object]:
    """Sampling defaults the checkpoint's ``generation_config.json`` asks for.

    Like vLLM, a model that ships ``do_sample: true`` with a temperature / top-p / top-k
    gets those as the job defaults; otherwise decoding defaults to greedy.
    """
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not config.get("do_sample"):
        return {}
    return {k: config[k] for k in ("temperature", "top_p", "top_k") if config.get(k) is not None}
