"""The flash backend with torch's real ``varlen_attn`` (FlashAttention's CUDA kernels), in bf16
and fp16; every test needs CUDA (the ``gpu`` marker skips them elsewhere). What only a GPU shows:

* the pure-torch reference the CPU tests run (tests/flash_helpers.py) is the kernel's contract:
  the same outputs and LSEs (natural log, (Hq, Tq)) on packed, bottom-right causal, windowed,
  full, GQA (the decode-only path too) and — where this torch reads pools in place — paged calls;
* the backend, split and unsplit, with this torch's signature and behind torch 2.11's (keys
  gathered), equals the torch reference backend;
* end to end on the bundled model in bf16, its tokens and their logprobs agree with the torch
  reference backend's (up to near-ties).

Tolerances. Against a float64 reference on the same inputs the kernel rounds P to the input
dtype before P @ V and rounds its output: 2e-2 (bf16, 8 mantissa bits) and 3e-3 (fp16, 11);
its LSE is a float32 reduction, 1e-3. Against the torch reference backend (itself rounding,
and the split adds a merge of two rounded halves): 3e-2 and 5e-3.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.engine import build_engine
from batchrun.core.job.requests import make_requests
from batchrun.core.job.rows import Row
from batchrun.core.params import SamplingParams
from batchrun.core.planner.plan import build_plan
from batchrun.core.planner.prompt_tokens import PromptTokens
from batchrun.core.runner.model_loader import load_model
from batchrun.kernels.flash import VarlenFeatures, torch_varlen
from batchrun.kernels.flash.varlen import LSE
from batchrun.kernels.flash_backend import FlashBackend

from flash_helpers import make_step, mixed, reference_varlen, torch_reference, with_2_11_signature

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
CONTRACT_TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
BACKEND_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
FEATURES = VarlenFeatures.of(torch_varlen().attend)
PAGE = 256  # FlashAttention 2's paged-KV page size multiple


def packed(lengths, num_heads, dtype, gen):
    """(T, H, 32) random rows on the GPU and their int32 offsets."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    rows = torch.randn(sum(lengths), num_heads, 32, generator=gen).to("cuda", dtype)
    return rows, cu


CASES = {  # (queries, keys) per sequence, window
    "causal, fewer queries than keys": ([(1, 37), (5, 64), (20, 20), (3, 300)], (-1, 0)),
    "sliding window": ([(1, 37), (5, 64), (20, 20), (3, 300)], (7, 0)),
    "full": ([(1, 37), (5, 64), (20, 20), (3, 300)], (-1, -1)),
    # one query per sequence, no window: with GQA the kernel swaps query heads into the
    # sequence dimension and reshapes its LSE back
    "decodes only": ([(1, 37), (1, 64), (1, 5), (1, 300)], (-1, -1)),
}


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_reference_is_the_kernels_contract(dtype, case, group):
    if group > 1 and not FEATURES.gqa:
        pytest.skip("this torch's varlen_attn has no enable_gqa")
    seqs, window = CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, cu_q = packed([n for n, _ in seqs], 2 * group, dtype, gen)
    k, cu_k = packed([n for _, n in seqs], 2, dtype, gen)
    v, _ = packed([n for _, n in seqs], 2, dtype, gen)
    args = (q, k, v, cu_q, cu_k, max(n for n, _ in seqs), max(n for _, n in seqs))
    options = dict(return_aux=LSE, scale=0.2, window_size=window)
    if group > 1:
        options["enable_gqa"] = True
    out, lse = torch_varlen().attend(*args, **options)
    want, want_lse = reference_varlen(*args, **options)
    assert lse.shape == want_lse.shape == (2 * group, q.shape[0])
    tol = CONTRACT_TOL[dtype]
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not FEATURES.paged, reason="this torch's varlen_attn cannot read a paged pool")
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_reference_is_the_kernels_contract_on_a_paged_pool(dtype):
    gen = torch.Generator().manual_seed(1)
    seqs = [(1, 37), (5, 600), (20, 256), (1, 513)]
    pages = [-(-n // PAGE) for _, n in seqs]
    order = torch.randperm(sum(pages) + 1, generator=gen).tolist()
    tables = torch.zeros(len(seqs), max(pages), dtype=torch.int32)
    for i, n in enumerate(pages):
        tables[i, :n] = torch.tensor(order[sum(pages[:i]) : sum(pages[:i]) + n])
    pool_k = torch.randn(len(order), PAGE, 2, 32, generator=gen).to("cuda", dtype)
    pool_v = torch.randn(len(order), PAGE, 2, 32, generator=gen).to("cuda", dtype)
    q, cu_q = packed([n for n, _ in seqs], 8, dtype, gen)
    used = torch.tensor([n for _, n in seqs], dtype=torch.int32, device="cuda")
    cu_k = torch.cat([used.new_zeros(1), used.cumsum(0, dtype=torch.int32)])
    args = (q, pool_k, pool_v, cu_q, cu_k, 20, 600)
    options = dict(
        return_aux=LSE, scale=0.2, window_size=(-1, 0), enable_gqa=True, seqused_k=used,
        block_table=tables.to("cuda"), num_splits=1,
    )  # fmt: skip
    out, lse = torch_varlen().attend(*args, **options)
    want, want_lse = reference_varlen(*args, **options)
    tol = CONTRACT_TOL[dtype]
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3)


def real_kernel(signature: str, windows: list):
    """torch's varlen_attn with this torch's signature or torch 2.11's, recording windows."""
    attend = torch_varlen().attend
    if signature == "2.11":
        attend = with_2_11_signature(attend)

    @functools.wraps(attend)  # keeps its signature, which the backend reads
    def counted(*args, **kwargs):
        windows.append(kwargs["window_size"])
        return attend(*args, **kwargs)

    return torch_varlen()._replace(attend=counted)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("signature", ["this torch", "2.11"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_equals_the_torch_reference(dtype, signature, group, split, window):
    backend = FlashBackend(1 if split else 10**9, kernel=real_kernel(signature, []))
    block_size = PAGE if backend.capabilities.in_place else 16
    seqs, prefixes = mixed(block_size)
    step = make_step(seqs, prefixes, block_size=block_size, num_kv_heads=2, group=group, seed=group)
    # a finite poison where no sequence owns a slot: the kernel masks it; a stray read would show
    step = step._replace(k_cache=step.k_cache.nan_to_num(30.0), v_cache=step.v_cache.nan_to_num(30.0))
    step = step.to("cuda", dtype)
    state = backend.build(step.meta)
    assert (state.own is not None) == split
    out = backend.forward(state, step.query, step.k_cache, step.v_cache, 0.2, sliding_window=window)
    tol = BACKEND_TOL[dtype]
    torch.testing.assert_close(out, torch_reference(step, 0.2, window), atol=tol, rtol=tol)


SYSTEM = (
    "You are a careful analyst. Answer from the document only, briefly and plainly. Quote the "
    "sentence you rely on, say when the document does not answer the question, and never guess "
    "a date, a name or a number that the document does not give. "
) * 4  # about 360 tokens: a prefix of whole 256-token blocks
LOGPROB_TOL = 0.1  # nats: bf16 logits of the same token after the same tokens, two backends


def greedy(loaded, prompts, max_tokens, block_size, **engine):
    """Greedy completions, with each token's logprob and the two most likely, in row order."""
    tokens = PromptTokens.from_lists(prompts)
    plan = build_plan(tokens, np.ones(len(prompts), bool), np.array(max_tokens), block_size)
    rows = [
        Row(i, str(i), f"row {i}", params=SamplingParams(max_tokens=n, logprobs=2))
        for i, n in enumerate(max_tokens)
    ]
    engine = build_engine(loaded, EngineConfig(block_size=block_size, attention_backend="torch"), **engine)
    done = {c.row: c for c in engine.generate(make_requests(rows, tokens, plan, job_seed=0))}
    return [done[i] for i in range(len(prompts))], engine


def test_tokens_agree_with_the_torch_reference_backend(tiny_llama):
    """bf16 on the bundled model (random weights: near-ties are common), prefixes split. Row by
    row, while both backends have produced the same tokens, the logprob of the next token agrees
    within LOGPROB_TOL; where they first part, it was a near-tie: flash's token is the reference's
    runner-up within LOGPROB_TOL of its choice."""
    loaded = load_model(tiny_llama, device="cuda", dtype="bfloat16")
    texts = [f"{SYSTEM}\nQ: {q}" for q in ("When?", "Of what?", "Who built it?", "Why?")] + ["Hi"]
    prompts = [loaded.tokenizer(t)["input_ids"] for t in texts]
    max_tokens = [8, 6, 7, 8, 5]
    windows = []
    backend = FlashBackend(kernel=real_kernel("this torch", windows))
    block_size = PAGE if backend.capabilities.in_place else 16
    got, engine = greedy(loaded, prompts, max_tokens, block_size, backend=backend)
    want, _ = greedy(loaded, prompts, max_tokens, block_size)
    assert engine.runner.backend.name == "flash" and (-1, -1) in windows
    for flash, ref in zip(got, want, strict=True):
        for mine, theirs in zip(flash.logprobs, ref.logprobs, strict=False):
            if mine["token"] != theirs["token"]:
                best, runner_up = theirs["top"]
                assert mine["token"] == runner_up["token"]
                assert best["logprob"] - runner_up["logprob"] < LOGPROB_TOL
                break
            assert abs(mine["logprob"] - theirs["logprob"]) < LOGPROB_TOL
