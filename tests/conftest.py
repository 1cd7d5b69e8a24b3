"""Shared fixtures: the bundled tokenizer, tiny random-weight checkpoints, and the oracle.

No test downloads anything: models are built from ``transformers`` configs with a fixed
seed and saved into temporary folders beside a copy of the bundled tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
SAMPLE_JOBS = REPO / "sample_jobs"
TINY_LLAMA = SAMPLE_JOBS / "models" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def save_tiny_model(config, folder: Path, seed: int = 0) -> Path:
    """Save a random-weight model for ``config`` with the bundled tokenizer into ``folder``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_LLAMA / name, folder / name)
    return folder


def reference_generate(model_path: Path, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """The oracle: transformers ``generate``, greedy, float32, one row at a time (no padding)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    outputs = []
    for ids, n in zip(prompts, max_tokens, strict=True):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=model.config.pad_token_id,
            )
        outputs.append(out[0, len(ids) :].tolist())
    return outputs


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return TINY_LLAMA
