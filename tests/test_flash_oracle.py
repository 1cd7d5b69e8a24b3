"""The oracle through the flash backend on CPU: greedy tokens equal transformers ``generate``
(float32) with every layer's attention in the flash backend, its ``varlen_attn`` the pure-torch
reference of the contract (tests/flash_helpers.py) — read in place (torch >= 2.12's
signature) and gathered (torch 2.11's), the groups' prefixes split off (counted), and a
sliding-window model. The real kernel runs in tests/test_flash_gpu.py."""

from __future__ import annotations

import functools

import pytest
from transformers import Gemma3TextConfig

from batchrun.core.runner.model_loader import load_model
from batchrun.kernels.flash_backend import FlashBackend

from flash_helpers import reference_kernel, reference_varlen, with_2_11_signature
from helpers import COMMON, reference_generate, run_engine, save_tiny_model

SYSTEM = "You are a careful analyst. Answer from the document only."
TEXTS = [
    f"{SYSTEM}\nThe lighthouse was built in 1871.\nQ: When?",
    f"{SYSTEM}\nThe lighthouse was built in 1871.\nQ: Of what?",
    f"{SYSTEM}\nThe bakery sells rye.\nQ: What?",
    "Hi",
]
SIGNATURES = {"in place": reference_varlen, "gathered": with_2_11_signature(reference_varlen)}


def counting_backend(signature: str, windows: list) -> FlashBackend:
    """The flash backend over the reference kernel, recording each call's window."""
    attend = SIGNATURES[signature]

    @functools.wraps(attend)  # keeps its signature, which the backend reads
    def counted(*args, **kwargs):
        windows.append(kwargs["window_size"])
        return attend(*args, **kwargs)

    return FlashBackend(kernel=reference_kernel(counted))


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(tiny_llama, device="cpu", dtype="float32")


@pytest.mark.parametrize("signature", sorted(SIGNATURES))
@pytest.mark.parametrize("block_size, token_budget", [(16, 4096), (8, 12)])
def test_flash_backend_equals_transformers_generate(loaded, tiny_llama, signature, block_size, token_budget):
    """Whole prompts in one step, and chunked prefill with small blocks (GQA 4/2)."""
    prompts = [loaded.tokenizer(t)["input_ids"] for t in TEXTS]
    max_tokens = [5, 4, 6, 3]
    windows = []
    got, engine = run_engine(
        loaded,
        prompts,
        max_tokens,
        block_size=block_size,
        token_budget=token_budget,
        backend=counting_backend(signature, windows),
    )
    assert engine.runner.backend.name == "flash"
    assert got == reference_generate(tiny_llama, prompts, max_tokens)
    assert (-1, -1) in windows, "no step split a group's prefix off"


@pytest.mark.parametrize("signature", sorted(SIGNATURES))
def test_sliding_window_model_equals_transformers_generate(signature, tmp_path):
    """Gemma 3: sliding-window layers (window 8, shorter than the prompts) beside full ones."""
    layers = ["sliding_attention", "full_attention"]
    config = Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, layer_types=layers)
    path = save_tiny_model(config, tmp_path / "gemma3")
    loaded = load_model(path, device="cpu", dtype="float32")
    texts = [
        "The lighthouse was built in 1871 from local granite, and its lamp burned paraffin.",
        "The lighthouse was built in 1871 from local granite. Who built it?",
        "Hello",
    ]
    prompts = [loaded.tokenizer(t)["input_ids"] for t in texts]
    max_tokens = [12, 9, 14]
    windows = []
    got, _ = run_engine(
        loaded,
        prompts,
        max_tokens,
        block_size=4,
        token_budget=11,
        backend=counting_backend(signature, windows),
    )
    assert got == reference_generate(path, prompts, max_tokens)
    assert (7, 0) in windows and (-1, -1) in windows  # windowed layers, and split full ones
