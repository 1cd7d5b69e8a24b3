"""What auto picks, and says it picked: the dtype from the checkpoint and the attention backend
from the device and the model (no model run here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma2Config

from batchrun.core.engine.backend_choice import choose_backend
from batchrun.core.engine.config import EngineConfig
from batchrun.core.errors import InputError
from batchrun.core.runner import model_loader
from batchrun.core.runner.kv_cache import KVCacheSpec
from batchrun.core.runner.model_loader import choose_dtype
from batchrun.kernels import cpu_backend
from batchrun.kernels.cpu import KernelUnavailable, build

from helpers import COMMON

CPU = torch.device("cpu")


def test_auto_dtype_follows_the_checkpoint(monkeypatch):
    assert choose_dtype("auto", CPU, torch.float32) == (torch.float32, "auto: the checkpoint's float32")
    assert choose_dtype("auto", CPU, None)[0] == torch.float32
    assert choose_dtype("bfloat16", CPU, torch.float32) == (torch.bfloat16, "--dtype bfloat16")
    monkeypatch.setattr(model_loader, "cpu_has_fast", lambda dtype: True)
    assert choose_dtype("auto", CPU, torch.bfloat16) == (torch.bfloat16, "auto: the checkpoint's bfloat16")
    monkeypatch.setattr(model_loader, "cpu_has_fast", lambda dtype: dtype == torch.float32)
    dtype, why = choose_dtype("auto", CPU, torch.bfloat16)
    assert dtype == torch.float32 and "no fast bfloat16" in why
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    cuda = torch.device("cuda")
    assert choose_dtype("auto", cuda, torch.float32)[0] == torch.bfloat16
    assert choose_dtype("auto", cuda, torch.float16)[0] == torch.float16


def fake_loaded(config, device=CPU, dtype=torch.float32):
    return SimpleNamespace(model=SimpleNamespace(config=config), device=device, dtype=dtype)


def spec(config, block_size=16):
    return KVCacheSpec.from_config(config, torch.float32, block_size)


def test_auto_takes_the_in_place_kernel_on_cpu_and_says_why():
    config = Gemma2Config(**COMMON, head_dim=16, sliding_window=8, attn_logit_softcapping=20.0)
    backend, why = choose_backend(EngineConfig(), fake_loaded(config), spec(config))
    assert backend.name == "cpu" and why == "auto: the in-place CPU kernel (supports the model)"


def test_auto_falls_back_to_the_torch_reference_when_the_kernel_cannot_build(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("BATCHRUN_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KernelUnavailable, match="cannot run the compiler .*no-such-compiler"):
        build.load.__wrapped__()  # uncached: the real build path, with a compiler that is not there

    def unbuildable():
        raise KernelUnavailable("needs a C++ compiler (none of $CXX, c++, g++, clang++ found)")

    monkeypatch.setattr(cpu_backend, "kernel", unbuildable)
    config = Gemma2Config(**COMMON, head_dim=16)
    backend, why = choose_backend(EngineConfig(), fake_loaded(config), spec(config))
    assert backend.name == "torch"
    assert why == (
        "auto: cpu needs a C++ compiler (none of $CXX, c++, g++, clang++ found), so the torch reference"
    )
    with pytest.raises(InputError, match="'cpu' needs a C\\+\\+ compiler.*--attention-backend"):
        choose_backend(EngineConfig(attention_backend="cpu"), fake_loaded(config), spec(config))


def test_a_named_backend_that_cannot_run_the_model_is_refused_before_any_work():
    pytest.importorskip("triton")  # the conftest runs it under the interpreter on CPU
    config = Gemma2Config(**{**COMMON, "hidden_size": 96}, head_dim=12)  # not a multiple of 8
    with pytest.raises(InputError, match="head dims .* not 12.*--attention-backend"):
        choose_backend(EngineConfig(attention_backend="triton"), fake_loaded(config), spec(config))
    fine = Gemma2Config(**COMMON, head_dim=16)
    backend, why = choose_backend(EngineConfig(attention_backend="triton"), fake_loaded(fine), spec(fine))
    assert backend.name == "triton" and why == "chosen with --attention-backend"


def test_token_budget_defaults_per_device_and_an_explicit_one_wins():
    assert EngineConfig().for_device("cpu").token_budget == 2048
    assert EngineConfig().for_device("cuda").token_budget == 4096  # thousands of tokens per step on a GPU
    assert EngineConfig(token_budget=96).for_device("cuda").token_budget == 96
