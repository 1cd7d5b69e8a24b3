"""The CPU's one-pass RMSNorm, rotary embedding and gated MLP (kernels/cpu/rms_norm.py,
rotary.py, gated_mlp.py): they round as transformers' Llama code does, replace only layers
that compute exactly that, and only during batchrun's steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
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
from batchrun.kernels.cpu.gated_mlp import silu_mul
from batchrun.kernels.cpu.rms_norm import rms_norm
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
    small = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2}
    silu = LlamaConfig(**small, hidden_act="silu")
    gelu = LlamaConfig(**small, hidden_act="gelu")
    biased = LlamaConfig(**small, hidden_act="silu", mlp_bias=True)
    model = torch.nn.Sequential(
        LlamaRMSNorm(8), Qwen2RMSNorm(8), GemmaRMSNorm(8), torch.nn.Linear(8, 8),
        LlamaMLP(silu), LlamaMLP(gelu), LlamaMLP(biased),
    )  # fmt: skip
    overrides = cpu_layer_overrides(model)
    # Gemma scales by (1 + weight); the MLP kernel is SiLU's, without biases
    assert set(overrides.forwards) == {model[0], model[1], model[4]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [16, 2048, 37])
def test_silu_mul_matches_torch(dtype, width):
    gen = torch.Generator().manual_seed(width)
    both = (torch.randn(45, 2 * width, generator=gen) * 4).to(dtype)
    gate, up = both.split(width, dim=-1)  # halves of one fused projection: strided rows
    expected, got = torch.nn.functional.silu(gate) * up, silu_mul(gate, up)
    # the exp is batchrun's, not SLEEF's: float32 may differ in its last bits, bf16 / fp16
    # only where those bits decide a rounding
    if dtype != torch.float32:
        assert (got == expected).float().mean() > 0.99
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-9}[dtype]  # one rounding step
    torch.testing.assert_close(got, expected, rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_mlp_runs_the_layer_and_leaves_the_model_computing_what_it_did(dtype):
    """In bf16 the gate and up weights become halves of one tensor (views, no copy): the layer
    outside a step computes exactly what it did; inside, one product and the fused kernel."""
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, hidden_act="silu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(LlamaMLP(config)).to(dtype)
    mlp, x = model[0], torch.randn(1, 21, 64).to(dtype)
    before = mlp(x)
    overrides = cpu_layer_overrides(model)
    assert set(overrides.forwards) == {mlp}
    if dtype == torch.bfloat16:
        base = mlp.gate_proj.weight.untyped_storage().data_ptr()
        assert mlp.up_proj.weight.untyped_storage().data_ptr() == base  # one tensor, two views
    assert torch.equal(mlp(x), before)
    with overrides:
        during = mlp(x)
    torch.testing.assert_close(during, before, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_overrides_hold_during_steps_only_and_the_model_stays_pristine(tiny_llama):
    loaded = load_model(tiny_llama, device="cpu", dtype="float32")
    engine = build_engine(loaded, EngineConfig(attention_backend="cpu"))
    overrides = engine.runner.overrides
    assert len(overrides) and "one-pass CPU kernels for RMSNorm in" in engine.info.attention_backend_choice
    assert "the gated MLP in" in engine.info.attention_backend_choice
    calls = []

    def counting(forward):
        def run(self, *args, **kwargs):
            calls.append(self)
            return forward(self, *args, **kwargs)

        return run

    overrides.forwards = {module: counting(forward) for module, forward in overrides.forwards.items()}
    tokens = PromptTokens.from_lists([[5, 6, 7, 8]])
    plan = build_plan(tokens, np.ones(1, bool), np.array([2]), 16, sharing=True, order="plan")
    rows = [Row(0, "0", "row 0", params=SamplingParams(max_tokens=2, temperature=0))]
    list(engine.generate(make_requests(rows, tokens, plan, job_seed=0, sample_sharing=True)))
    steps = engine.stats.steps
    assert steps and len(calls) == steps * len(overrides.forwards)  # every layer, every step
    assert {type(m).__name__ for m in calls} == {"LlamaRMSNorm", "LlamaMLP"}
    assert all("forward" not in vars(module) for module in overrides.forwards)  # nothing left behind
    for module in overrides.forwards:  # outside a step: transformers' own layers
        width = module.weight.shape[0] if hasattr(module, "weight") else module.hidden_size
        module(torch.randn(2, width))
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
