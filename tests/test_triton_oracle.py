"""The oracle through the Triton backend: greedy tokens equal transformers ``generate`` with
every layer's attention in Triton kernels (shared-prefix split included). Without a GPU the
kernels run under Triton's interpreter, on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
pytest.importorskip("triton")

from batchrun.core.runner.model_loader import load_model  # noqa: E402
from batchrun.kernels import triton_backend  # noqa: E402

from helpers import reference_generate, run_engine  # noqa: E402

SYSTEM = "You are a careful analyst. Answer from the document only."
TEXTS = [
    f"{SYSTEM}\nThe lighthouse was built in 1871.\nQ: When?",
    f"{SYSTEM}\nThe lighthouse was built in 1871.\nQ: Of what?",
    f"{SYSTEM}\nThe bakery sells rye.\nQ: What?",
    "Hi",
]


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    # On a GPU the compiled kernels; elsewhere the interpreter, on the CPU.
    return load_model(tiny_llama, device="cuda" if torch.cuda.is_available() else "cpu", dtype="float32")


@pytest.mark.parametrize("block_size, token_budget", [(16, 4096), (8, 12)])
def test_triton_backend_equals_transformers_generate(
    loaded, tiny_llama, monkeypatch, block_size, token_budget
):
    """Whole prompts in one step, and chunked prefill with small blocks; the groups' prefixes
    go through the prefix kernel (counted), their members' own parts through kv_start."""
    calls = []
    real = triton_backend.prefix_attention
    monkeypatch.setattr(triton_backend, "prefix_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = [loaded.tokenizer(t)["input_ids"] for t in TEXTS]
    max_tokens = [5, 4, 6, 3]
    expected = reference_generate(tiny_llama, prompts, max_tokens)
    got, engine = run_engine(
        loaded,
        prompts,
        max_tokens,
        block_size=block_size,
        token_budget=token_budget,
        attention_backend="triton",
    )
    assert engine.runner.backend.name == "triton"
    assert got == expected
    assert calls, "no step split a group's prefix off"


def test_triton_backend_with_split_kv_equals_transformers_generate(loaded, tiny_llama, monkeypatch):
    """Every attention launch split three ways (split-KV and its reduce), chunked prefill."""
    splits = []

    def split(kernel):
        def call(*args, **kwargs):
            splits.append(kernel.__name__)
            return kernel(*args, **{**kwargs, "num_splits": 3})

        return call

    monkeypatch.setattr(triton_backend, "paged_attention", split(triton_backend.paged_attention))
    monkeypatch.setattr(triton_backend, "prefix_attention", split(triton_backend.prefix_attention))
    prompts = [loaded.tokenizer(t)["input_ids"] for t in TEXTS]
    max_tokens = [5, 4, 6, 3]
    expected = reference_generate(tiny_llama, prompts, max_tokens)
    got, _ = run_engine(
        loaded, prompts, max_tokens, block_size=8, token_budget=12, attention_backend="triton"
    )
    assert got == expected
    assert {"paged_attention", "prefix_attention"} <= set(splits)


def test_a_head_dim_that_is_not_a_power_of_two(tmp_path):
    """Head dim 48 (Phi-3-mini's 96 in small): the kernels pad it to 64 and mask the rest."""
    from transformers import LlamaConfig

    from helpers import COMMON, save_tiny_model

    path = save_tiny_model(LlamaConfig(**COMMON, head_dim=48), tmp_path / "llama-48")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, device=device, dtype="float32")
    prompts = [model.tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    max_tokens = [6, 5, 4]
    got, engine = run_engine(
        model, prompts, max_tokens, block_size=8, token_budget=16, attention_backend="triton"
    )
    assert engine.runner.backend.name == "triton"
    assert got == reference_generate(path, prompts, max_tokens)
