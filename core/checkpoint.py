"""A local Hugging Face checkpoint folder, read once: config, tokenizer, context length,
identity and sampling defaults, shared by ``run``, ``plan`` and ``validate``.

Nothing is fetched from a hub: every load is ``local_files_only``. Problems a user can fix
(missing folder, no tokenizer, no weights, unsupported architecture) raise ``InputError``
saying what to do, before any other work. The weights themselves are loaded by the runner
(runner/model_loader.py), only when there is something to generate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from batchrun.core.errors import InputError

# Decoder-only architectures whose tiny configs pass the oracle test (tests/test_architectures.py).
SUPPORTED_MODEL_TYPES = ("gemma2", "gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# Files whose content decides what the checkpoint generates (hashed into its identity).
IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


@dataclass(frozen=True, eq=False)
class Checkpoint:
    path: Path
    model_type: str
    config: PretrainedConfig  # the full config (``text_config`` for the decoder's shape)
    tokenizer: PreTrainedTokenizerBase
    max_context: int  # positions the model supports (prompt + output)
    identity: str  # fingerprint of what it generates (journal keys, reports)
    sampling_defaults: dict[str, Any]  # from generation_config.json, as vLLM applies them
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the template

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def text_config(self) -> PretrainedConfig:
        return self.config.get_text_config()


def open_checkpoint(
    path: Path,
    *,
    need_weights: bool = True,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Checkpoint:
    """Check and read ``path`` (no weights loaded); ``InputError`` if it cannot be used.
    ``need_weights=False`` for commands that only tokenize and plan. ``chat_template`` (Jinja
    text) replaces the tokenizer's own; ``chat_template_kwargs`` are passed to it (e.g.
    Qwen3's ``enable_thinking``)."""
    model_type = check_model_folder(path, need_weights=need_weights)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: config.json could not be read ({exc})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: the tokenizer could not be loaded ({exc})") from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    identity = model_identity(path)
    if chat_template is not None or chat_template_kwargs:
        extra = json.dumps([chat_template, chat_template_kwargs or {}], sort_keys=True).encode()
        identity += ":" + hashlib.blake2b(extra, digest_size=4).hexdigest()
    return Checkpoint(
        path=path,
        model_type=model_type,
        config=config,
        tokenizer=tokenizer,
        max_context=config.get_text_config().max_position_embeddings,
        identity=identity,
        sampling_defaults=sampling_defaults(path),
        chat_template_kwargs=dict(chat_template_kwargs or {}),
    )


def check_model_folder(path: Path, *, need_weights: bool = True) -> str:
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
    if need_weights and not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise InputError(
            f"{path} has no weights (no *.safetensors or *.bin file); "
            "copy the checkpoint's weight files into the folder"
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


# generation_config.json keys vLLM takes as sampling defaults (`get_diff_sampling_param`).
GENERATION_DEFAULT_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def sampling_defaults(path: Path) -> dict[str, Any]:
    """Sampling defaults from the checkpoint's ``generation_config.json``, as vLLM applies them
    (``generation_config="auto"``): the non-default values of ``repetition_penalty``,
    ``temperature``, ``top_k``, ``top_p``, ``min_p`` and ``max_new_tokens`` (as ``max_tokens``),
    whatever ``do_sample`` says. A folder without the file, or an unreadable one, gives none.
    """
    if not (path / "generation_config.json").is_file():
        return {}
    try:
        config = GenerationConfig.from_pretrained(path, local_files_only=True).to_diff_dict()
    except (OSError, ValueError):
        return {}
    found = {k: config[k] for k in GENERATION_DEFAULT_KEYS if config.get(k) is not None}
    if "max_new_tokens" in found:
        found["max_tokens"] = found.pop("max_new_tokens")
    return found
