"""The CPU's one-pass RMSNorm and rotary embedding (kernels/cpu/rms_norm.py, rotary.py): they
round as transformers' Llama code does, replace only layers that compute exactly that, and
only during batchrun's steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama import modeling_llama
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
from batchrun.kernels.cpu.rotary import fused_apply_rotary_pos_emb


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
    assert len(overrides) and "one-pass CPU kernels for RMSNorm in" in engine.info.attention_backend_choice
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
    assert steps and len(calls) == steps * len(overrides.forwards)  # every layer, every step
    assert all("forward" not in vars(norm) for norm in overrides.forwards)  # nothing left behind
    norm = next(iter(overrides.forwards))
    norm(torch.randn(2, norm.weight.shape[0]))  # outside a step: transformers' own layer
    assert len(calls) == steps * len(overrides.forwards)
    assert modeling_llama in overrides.functions  # the rotary embedding was replaced ...
    assert modeling_llama.apply_rotary_pos_emb is not fused_apply_rotary_pos_emb  # ... and restored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, dim, tokens", [(8, 2, 64, 37), (4, 4, 32, 1), (2, 1, 128, 300)])
def test_rotary_equals_llamas_apply_rotary_pos_emb_bit_for_bit(dtype, heads, kv_heads, dim, tokens):
    gen = torch.Generator().manual_seed(tokens)
    # queries and keys as the attention layer makes them: a (1, T, H, D) projection, transposed
    q = (torch.randn(1, tokens, heads, dim, generator=gen) * 3).to(dtype).transpose(1, 2)
    k = (torch.randn(1, tokens, kv_heads, dim, generator=gen) * 3).to(dtype).transpose(1, 2)
    config = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, rope_theta=10000.0)
    positions = torch.randint(0, 4000, (1, tokens), generator=gen)
    cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(q.transpose(1, 2), positions)
    expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got = fused_apply_rotary_pos_emb(q, k, cos, sin)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and torch.equal(g, e)  # each product and sum rounded as torch does
        assert g.transpose(1, 2).is_contiguous()  # (T, heads, D) in memory: what the attention hook reads


def test_rotary_falls_back_to_transformers_where_the_kernel_does_not_cover_the_call():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)  # a batch of two rows: not batchrun's steps
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for g, e in zip(fused_apply_rotary_pos_emb(q, k, cos, sin), expected, strict=True):
        assert torch.equal(g, e)
