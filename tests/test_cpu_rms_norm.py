"""The CPU's one-pass RMSNorm (kernels/cpu/rms_norm.py): rounds as transformers' Llama layer
does, replaces only layers that compute exactly that, and only during batchrun's steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.engine import build_engine
from batchrun.core.job.requests import make_requests
from batchrun.core.job.rows import Row
from batchrun.core.params import SamplingParams
from batchrun.core.planner.plan import build_plan
from batchrun.core.planner.prompt_tokens import PromptTokens
from batchrun.core.runner.layer_overrides import cpu_layer_overrides
from batchrun.core.runner.model_loader import load_model
from batchrun.kernels.cpu.rms_norm import fused_rms_norm_forward, rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [8, 64, 512, 1000])
def test_rms_norm_matches_the_llama_layer(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    layer = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    layer.weight.data = torch.randn(hidden, generator=gen).to(dtype)
    x = (torch.randn(3, 37, hidden, generator=gen) * 4).to(dtype)
    expected, got = layer(x), rms_norm(x, layer.weight, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    # Both round x * r, then weight * that, to the dtype; only the sum of squares adds in
    # another order, so r may differ in its last bit and a value land one rounding step away.
    if dtype != torch.float32:  # in bf16 / fp16 that is rare
        assert (got == expected).float().mean() > 0.99
    ulp = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-9}[dtype]
    torch.testing.assert_close(got, expected, rtol=ulp, atol=1e-6)


def test_strided_rows_are_read_in_place():
    x = torch.randn(6, 40)[:, :32]  # rows 40 apart
    layer = LlamaRMSNorm(32, eps=1e-6)
    layer.weight.data = torch.randn(32)
    torch.testing.assert_close(rms_norm(x, layer.weight, 1e-6), layer(x), rtol=2e-6, atol=1e-6)


def test_only_layers_that_compute_llamas_formula_are_replaced():
    model = torch.nn.Sequential(LlamaRMSNorm(8), Qwen2RMSNorm(8), GemmaRMSNorm(8), torch.nn.Linear(8, 8))
    overrides = cpu_layer_overrides(model)
    assert set(overrides.forwards) == {model[0], model[1]}  # Gemma scales by (1 + weight): not it


def test_overrides_hold_during_steps_only_and_the_model_stays_pristine(tiny_llama):
    loaded = load_model(tiny_llama, device="cpu", dtype="float32")
    engine = build_engine(loaded, EngineConfig(attention_backend="cpu"))
    overrides = engine.runner.overrides
    assert len(overrides) and "RMSNorm: the one-pass CPU kernel" in engine.info.attention_backend_choice
    calls = []

    def counted(self, x):
        calls.append(1)
        return fused_rms_norm_forward(self, x)

    overrides.forwards = dict.fromkeys(overrides.forwards, counted)
    tokens = PromptTokens.from_lists([[5, 6, 7, 8]])
    plan = build_plan(tokens, np.ones(1, bool), np.array([2]), 16, sharing=True, order="plan")
    rows = [Row(0, "0", "row 0", params=SamplingParams(max_tokens=2, temperature=0))]
    list(engine.generate(make_requests(rows, tokens, plan, job_seed=0, sample_sharing=True)))
    steps = engine.stats.steps
    assert steps and len(calls) == steps * len(overrides)  # every layer, every step
    assert all("forward" not in vars(norm) for norm in overrides.forwards)  # nothing left behind
    norm = next(iter(overrides.forwards))
    norm(torch.randn(2, norm.weight.shape[0]))  # outside a step: transformers' own layer
    assert len(calls) == steps * len(overrides)
