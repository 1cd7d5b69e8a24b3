"""Every supported architecture passes the oracle on a tiny random-weight config.

Gemma 2 covers attention soft-capping and sliding-window layers (the window is set
shorter than the prompts so it matters); Phi-3 covers fused QKV projections.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from batchrun.core.checkpoint import SUPPORTED_MODEL_TYPES
from batchrun.core.runner.cuda_graphs import cuda_graph_capture, rerun_capture
from batchrun.core.runner.model_loader import load_model

from helpers import COMMON, reference_generate, run_engine, save_tiny_model

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**COMMON),
    "gemma2": lambda: Gemma2Config(
        **COMMON, head_dim=16, sliding_window=8, attn_logit_softcapping=20.0, final_logit_softcapping=15.0
    ),
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, layer_types=None),
}


def test_every_supported_type_is_tested():
    assert set(CONFIGS) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("attention_backend", ["cpu", "torch"])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_architecture_matches_transformers_generate(model_type, attention_backend, tmp_path):
    """Through the plan: the two lighthouse prompts share their first blocks, and their
    decodes go through the shared-prefix path (where the model allows it), in the in-place
    CPU kernel and in the torch reference."""
    path = save_tiny_model(CONFIGS[model_type](), tmp_path / model_type)
    loaded = load_model(path, device="cpu", dtype="float32")
    tok = loaded.tokenizer
    texts = [
        "The lighthouse was built in 1871 from local granite, and its lamp burned paraffin.",
        "The lighthouse was built in 1871 from local granite. Who built it?",
        "Hello",
    ]
    prompts = [tok(t)["input_ids"] for t in texts]
    max_tokens = [12, 9, 14]
    expected = reference_generate(path, prompts, max_tokens)
    got, engine = run_engine(
        loaded,
        prompts,
        max_tokens,
        block_size=4,
        token_budget=11,
        cascade_min_saved_tokens=1,
        attention_backend=attention_backend,
    )
    assert got == expected
    assert engine.stats.cached_prompt_tokens > 0


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_architecture_runs_in_cuda_graphs(model_type, tmp_path):
    """Every architecture's forward can be captured (no host sync in it: the first padded
    run is probed) and gives ``generate``'s tokens when replayed through the Triton backend.
    On a GPU, real graphs; elsewhere the kernels interpreted and a replay that reruns the
    forward on the captured step's tensors, refreshed (see tests/test_cuda_graphs.py)."""
    path = save_tiny_model(CONFIGS[model_type](), tmp_path / model_type)
    cuda = torch.cuda.is_available()
    loaded = load_model(path, device="cuda" if cuda else "cpu", dtype="float32")
    capture = cuda_graph_capture if cuda else rerun_capture
    prompts = [loaded.tokenizer(t)["input_ids"] for t in ("The lighthouse was built in 1871.", "Hi")]
    max_tokens = [8, 6]
    graphs = []
    got, engine = run_engine(
        loaded,
        prompts,
        max_tokens,
        block_size=4,
        token_budget=64,
        attention_backend="triton",
        on_build=lambda engine: graphs.append(engine.runner.use_graphs(capture)),
    )
    assert got == reference_generate(path, prompts, max_tokens)
    assert graphs[0].disabled is None and graphs[0].replays > 0
