"""The flash backend on CPU, through a pure-torch ``varlen_attn`` (tests/flash_helpers.py),
against the torch reference backend on random packed steps — split and unsplit, in place
(torch >= 2.12's signature) and gathered (torch 2.11's), GQA 1-8, block sizes 16-64, sliding
windows — and what it declares and how the engine chooses it. The real kernel runs in
tests/test_flash_gpu.py.

Every cache slot no sequence owns is NaN in the flash backend's cache, so a single stray read
shows; the torch reference, which masks rather than skips such slots, reads zeros there.
"""

from __future__ import annotations

import functools
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig

from batchrun.core.engine.backend_choice import choose_backend
from batchrun.core.engine.config import EngineConfig
from batchrun.core.errors import InputError
from batchrun.core.runner.kv_cache import KVCacheSpec
from batchrun.kernels import BackendUnavailable, get_backend
from batchrun.kernels.flash import VarlenFeatures, lse_rows, run_call
from batchrun.kernels.flash_backend import FlashBackend

from flash_helpers import (
    Seq,
    make_step,
    mixed,
    reference_kernel,
    reference_varlen,
    torch_reference,
    with_2_11_signature,
)
from helpers import COMMON

KERNELS = {
    "in place": reference_kernel(),  # torch >= 2.12's signature
    "gathered": reference_kernel(with_2_11_signature(reference_varlen)),
}
NEVER_SPLIT = 10**9


@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_forward_equals_the_torch_reference(block_size, group, kernel, split, window):
    seqs, prefixes = mixed(block_size)
    step = make_step(
        seqs, prefixes, block_size=block_size, num_kv_heads=2, group=group, seed=block_size + group
    )
    backend = FlashBackend(1 if split else NEVER_SPLIT, kernel=KERNELS[kernel])
    state = backend.build(step.meta)
    assert (state.own is not None) == split
    if split:  # both groups, without the member still computing the prefix
        assert state.prefixes.cu_seq_q.tolist() == [0, 1 + 4 + 1, 6 + 1 + 3]
    assert (state.whole.block_table is not None) == (kernel == "in place")
    out = backend.forward(state, step.query, step.k_cache, step.v_cache, 0.2, sliding_window=window)
    torch.testing.assert_close(out, torch_reference(step, 0.2, window), atol=2e-5, rtol=2e-5)


def test_the_own_part_skips_the_prefix_and_the_prefix_part_reads_it():
    """Group 0's prefix blocks poisoned after planning: its split members' own rows do not
    change; the member still computing the prefix (not split) and the group's prefix rows do."""
    seqs, prefixes = mixed(16)
    step = make_step(seqs, prefixes, block_size=16, num_kv_heads=2, group=2, seed=3)
    poisoned = step.k_cache.clone()
    poisoned[step.meta.block_tables[5, :2].long()] = float("nan")  # group 0's two prefix blocks
    starts = step.meta.q_starts_host
    split_rows, unsplit_rows = slice(starts[5], starts[8]), slice(starts[8], starts[9])
    for kernel in KERNELS.values():
        backend = FlashBackend(kernel=kernel)
        state = backend.build(step.meta)
        own = run(backend, state.own, step, (-1, 0))
        again = run(backend, state.own, step._replace(k_cache=poisoned), (-1, 0))
        assert not own.isnan().any()
        assert torch.equal(own[split_rows], again[split_rows]) and again[unsplit_rows].isnan().all()
        prefix = run(backend, state.prefixes, step._replace(k_cache=poisoned), (-1, -1))
        assert prefix[:6].isnan().all() and not prefix[6:].isnan().any()  # group 0's rows, group 1's


def run(backend, call, step, window):
    out, _ = run_call(
        backend.kernel, backend.features, call, step.query, step.k_cache, step.v_cache, 0.2, window, False
    )
    return out


def test_window_is_transformers_sliding_window():
    """transformers' window W: a query sees the last W keys, itself included (W - 1 to its left)."""
    step = make_step([Seq(6, 30), Seq(1, 9)], [], block_size=16, num_kv_heads=1, group=1, seed=5)
    seen = []

    @functools.wraps(reference_varlen)  # keeps its signature, which the backend reads
    def spy(*args, **kwargs):
        seen.append(kwargs["window_size"])
        return reference_varlen(*args, **kwargs)

    backend = FlashBackend(kernel=reference_kernel(spy))
    state = backend.build(step.meta)
    out = backend.forward(state, step.query, step.k_cache, step.v_cache, 0.3, sliding_window=4)
    assert seen == [(3, 0)]
    torch.testing.assert_close(out, torch_reference(step, 0.3, 4), atol=2e-5, rtol=2e-5)


def test_lse_layout_is_checked():
    lse = torch.randn(4, 6)  # (Hq, Tq)
    assert torch.equal(lse_rows(lse, 6, 4), lse.t())
    with pytest.raises(RuntimeError, match="LSE of shape \\(6, 4\\)"):
        lse_rows(lse.t(), 6, 4)


# -- what it declares, and how the engine chooses it ---------------------------------------------


def test_capabilities_follow_the_signature():
    real = FlashBackend()  # this torch's varlen_attn
    assert real.capabilities.devices == {"cuda"}
    assert real.capabilities.dtypes == {torch.float16, torch.bfloat16}
    assert not real.capabilities.softcap and real.capabilities.sliding_window
    assert real.capabilities.shared_prefix
    assert {8, 64, 80, 128, 256} <= real.capabilities.head_dims and 512 not in real.capabilities.head_dims
    if real.features.paged:  # torch >= 2.12: in place, FlashAttention 2's 256-token pages
        assert real.capabilities.in_place and real.capabilities.block_size_multiple == 256
    gathered = FlashBackend(kernel=KERNELS["gathered"])
    assert gathered.features == VarlenFeatures(paged=False, gqa=False, num_splits=False)
    assert not gathered.capabilities.in_place and gathered.capabilities.block_size_multiple == 1
    assert "cannot read the paged KV cache in place" in gathered.description

    def too_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False):
        raise AssertionError("never called")

    with pytest.raises(BackendUnavailable, match="window_size"):
        FlashBackend(kernel=KERNELS["gathered"]._replace(attend=too_old))


def test_the_real_kernel_has_no_cpu_implementation():
    """Why the backend declares CUDA only."""
    q = torch.zeros(4, 2, 32, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(NotImplementedError):
        FlashBackend().kernel.attend(q, q, q, cu, cu, 4, 4)


def test_a_torch_without_varlen_is_unavailable(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("batchrun.kernels.flash")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # import fails
    with pytest.raises(BackendUnavailable, match="needs torch.nn.attention.varlen"):
        get_backend("flash")


CUDA = torch.device("cuda")


def fake_loaded(config, device=CUDA, dtype=torch.bfloat16):
    return SimpleNamespace(model=SimpleNamespace(config=config), device=device, dtype=dtype)


def choose(config, block_size=16, dtype=torch.bfloat16, name="flash", given=None):
    spec = KVCacheSpec.from_config(config, dtype, block_size)
    engine = EngineConfig(attention_backend=name, block_size=block_size)
    return choose_backend(engine, fake_loaded(config, dtype=dtype), spec, given=given)


def test_the_engine_takes_flash_only_where_it_runs_the_model():
    llama = LlamaConfig(**COMMON)
    real = FlashBackend()
    if real.features.paged:
        with pytest.raises(InputError, match="'flash' needs a block size that is a multiple of 256, not 16"):
            choose(llama)
    backend, why = choose(llama, block_size=256)
    assert backend.name == "flash" and why.startswith("chosen with --attention-backend")
    with pytest.raises(InputError, match="'flash' does not support torch.float32"):
        choose(llama, block_size=256, dtype=torch.float32)
    gemma = Gemma2Config(**COMMON, head_dim=16, attn_logit_softcapping=20.0)
    with pytest.raises(InputError, match="'flash' cannot soft-cap attention scores"):
        choose(gemma, block_size=256)


def test_auto_never_takes_flash_and_a_gathering_flash_says_so():
    pytest.importorskip("triton")  # on CUDA auto prefers Triton (interpreted on this CPU)
    llama = LlamaConfig(**COMMON)
    backend, why = choose(llama, name="auto")
    assert backend.name == "triton" and why.startswith("auto: Triton")
    gathered = KERNELS["gathered"]._replace(devices=frozenset({"cuda"}), page_size_multiple=256)
    backend, why = choose(llama, given=FlashBackend(kernel=gathered))  # torch 2.11: any block size
    assert backend.name == "flash"
    assert why == (
        "given by the caller (it gathers copies of the blocks: it does not read the paged KV cache in place)"
    )
