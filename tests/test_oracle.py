"""The correctness oracle: batchrun's greedy tokens equal transformers ``generate`` for every
row, whatever the plan order, prefix sharing, token budget (chunked prefill), block size,
KV budget (admission rounds, preemption) or reservation policy."""

from __future__ import annotations

import numpy as np
import pytest

from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.engine import build_engine
from batchrun.core.job.requests import make_requests
from batchrun.core.job.rows import Row
from batchrun.core.params import SamplingParams
from batchrun.core.planner.plan import build_plan
from batchrun.core.planner.prompt_tokens import PromptTokens
from batchrun.core.runner.kv_cache import KVCacheSpec
from batchrun.core.runner.model_loader import load_model
from batchrun.core.sched.config import SchedulerConfig

from helpers import reference_generate, run_engine

SYSTEM = "You are a careful analyst. Answer from the document only, briefly."
DOCS = ["The lighthouse was built in 1871 from granite.", "The bakery sells rye bread by nine."]
QUESTIONS = ["When was it built?", "What is sold?", "Summarise it."]


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(tiny_llama, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def workload(loaded):
    """Shared prefixes (system > document > question), an identical pair, a prompt that is a
    prefix of another, a one-token prompt, and varied max_tokens."""
    tok = loaded.tokenizer
    texts = [f"{SYSTEM}\n{doc}\nQ: {q}\nA:" for doc in DOCS for q in QUESTIONS]
    texts += [texts[0], SYSTEM, "Hi"]
    prompts = [tok(t)["input_ids"] for t in texts]
    max_tokens = [6 + (3 * i) % 11 for i in range(len(prompts))]
    return prompts, max_tokens


@pytest.fixture(scope="module")
def expected(tiny_llama, workload):
    prompts, max_tokens = workload
    return reference_generate(tiny_llama, prompts, max_tokens)


@pytest.mark.parametrize("token_budget", [5, 64, 4096])
@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_greedy_equals_transformers_generate(loaded, workload, expected, token_budget, block_size):
    prompts, max_tokens = workload
    got, engine = run_engine(loaded, prompts, max_tokens, token_budget=token_budget, block_size=block_size)
    assert got == expected
    if token_budget == 5:
        assert engine.stats.steps > max(len(p) for p in prompts) // 5, "prompts were not chunked"


@pytest.mark.parametrize("sharing", [True, False])
@pytest.mark.parametrize("order", ["plan", "input"])
@pytest.mark.parametrize("attention_backend", ["cpu", "torch"])
def test_oracle_holds_with_and_without_the_plans_two_ideas(
    loaded, workload, expected, sharing, order, attention_backend
):
    """Through the in-place CPU kernel (what ``auto`` runs on CPU) and the torch reference."""
    prompts, max_tokens = workload
    got, engine = run_engine(
        loaded,
        prompts,
        max_tokens,
        sharing=sharing,
        order=order,
        token_budget=48,
        block_size=4,
        attention_backend=attention_backend,
    )
    assert engine.runner.backend.name == attention_backend
    assert got == expected
    if sharing:
        assert engine.stats.cached_prompt_tokens > 0 and engine.stats.saving > 0.3
    else:
        assert (
            engine.stats.cached_prompt_tokens == 0
            and engine.stats.prefill_tokens == engine.stats.prompt_tokens
        )


@pytest.mark.parametrize("reserve_full", [False, True])
@pytest.mark.parametrize("slack_blocks", [0, 3])
def test_oracle_holds_when_kv_memory_forces_admission_rounds(
    loaded, workload, expected, reserve_full, slack_blocks
):
    prompts, max_tokens = workload
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=32, dtype=loaded.dtype, block_size=8)
    # Room for the largest single request (plus a little), so requests run a few at a time.
    largest = max(len(p) + n for p, n in zip(prompts, max_tokens, strict=True))
    num_blocks = spec.blocks_for(largest) + slack_blocks
    got, engine = run_engine(
        loaded,
        prompts,
        max_tokens,
        token_budget=256,
        block_size=8,
        kv_cache_bytes=num_blocks * spec.bytes_per_block,
        reserve_full=reserve_full,
    )
    assert got == expected
    assert engine.kv.pool.num_blocks == num_blocks
    assert engine.stats.peak_blocks <= engine.kv.pool.num_blocks
    if reserve_full:
        assert engine.stats.preemptions == 0


def test_oracle_holds_through_preemption(loaded, workload, expected):
    """Expected-growth admission with outputs longer than the hint: the pool runs dry, the
    newest requests are preempted and recomputed, and no output changes."""
    prompts, max_tokens = workload
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=32, dtype=loaded.dtype, block_size=4)
    largest = max(len(p) + n for p, n in zip(prompts, max_tokens, strict=True))
    num_blocks = spec.blocks_for(largest) + 6
    eager = SchedulerConfig(min_observed=1, growth_margin=0.1)  # trust one short output: admit eagerly
    got, engine = run_engine(
        loaded,
        prompts,
        max_tokens,
        token_budget=64,
        block_size=4,
        kv_cache_bytes=num_blocks * spec.bytes_per_block,
        scheduler=eager,
    )
    assert got == expected
    assert engine.stats.preemptions > 0, "the test meant to force preemption"


def test_n_samples_share_the_prompt_and_follow_their_seeds(loaded, workload):
    prompts, _ = workload
    prompts = prompts[:3]
    together, engine = run_engine(loaded, prompts, [8] * 3, n=3, seed=11, token_budget=64, block_size=4)
    assert engine.stats.cached_prompt_tokens > 0
    # Sample k of a row is the same whatever else runs: alone, without sharing, in input order.
    alone, _ = run_engine(loaded, prompts[1:2], [8], n=3, seed=11, token_budget=64, block_size=4)
    plain, _ = run_engine(
        loaded, prompts, [8] * 3, n=3, seed=11, sharing=False, token_budget=7, block_size=16
    )
    assert together[1] == alone[0] and together == plain
    assert len({tuple(s) for s in together[0]}) > 1, "the three samples should differ"


def test_single_row_job(loaded, workload, expected):
    prompts, max_tokens = workload
    got, _ = run_engine(loaded, prompts[:1], max_tokens[:1], token_budget=16, block_size=16)
    assert got == expected[:1]


def test_oracle_holds_with_the_cascade_decode_kernel(loaded, workload, expected, monkeypatch):
    """The torch reference: force every decode group through its shared-prefix (cascade)
    kernel and count its use."""
    from batchrun.kernels import torch_ref

    calls = []
    real = torch_ref.cascade_decode
    monkeypatch.setattr(torch_ref, "cascade_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts, max_tokens = workload
    got, _ = run_engine(
        loaded,
        prompts,
        max_tokens,
        token_budget=64,
        block_size=4,
        cascade_min_saved_tokens=1,
        attention_backend="torch",
    )
    assert got == expected
    assert calls, "no decode group went through the cascade kernel"


def test_a_request_that_can_never_fit_the_pool_gets_an_error_and_the_rest_run(loaded, workload, expected):
    prompts, max_tokens = workload
    long_prompt = prompts[0] + prompts[1] * 6  # shares its first blocks with row 0
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=32, dtype=loaded.dtype, block_size=4)
    pool_blocks = spec.blocks_for(max(len(p) + n for p, n in zip(prompts, max_tokens, strict=True)))
    assert spec.blocks_for(len(long_prompt) + 4) > pool_blocks
    engine = build_engine(
        loaded, EngineConfig(block_size=4, kv_cache_bytes=pool_blocks * spec.bytes_per_block)
    )
    all_prompts = [*prompts, long_prompt]
    tokens = PromptTokens.from_lists(all_prompts)
    limits = np.array([*max_tokens, 4])
    plan = build_plan(tokens, np.ones(len(all_prompts), bool), limits, 4)
    rows = [
        Row(i, str(i), f"row {i}", params=SamplingParams(max_tokens=int(m))) for i, m in enumerate(limits)
    ]
    done = {c.row: c for c in engine.generate(make_requests(rows, tokens, plan, job_seed=0))}
    assert done[len(prompts)].finish_reason == "error" and "whole pool" in done[len(prompts)].error
    assert [done[i].token_ids for i in range(len(prompts))] == expected
    assert engine.kv.num_free == engine.kv.pool.num_blocks and not engine.kv.prefixes.segments


def test_the_oracle_holds_when_every_message_crosses_a_process_boundary(loaded, workload, expected):
    """The scheduler and the runner share nothing but messages: pickling every step plan on
    its way in and every result on its way out (what another process would receive) changes
    nothing, preemption and shared segments included."""
    import pickle

    prompts, max_tokens = workload
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=32, dtype=loaded.dtype, block_size=4)
    largest = max(len(p) + n for p, n in zip(prompts, max_tokens, strict=True))
    config = dict(
        token_budget=32, block_size=4, kv_cache_bytes=(spec.blocks_for(largest) + 6) * spec.bytes_per_block
    )
    crossings = []

    def remote(execute):
        def run(plan):
            crossings.append(1)
            result = execute(pickle.loads(pickle.dumps(plan)))
            return pickle.loads(pickle.dumps(result))

        return run

    got, engine = run_engine(
        loaded,
        prompts,
        max_tokens,
        scheduler=SchedulerConfig(min_observed=1, growth_margin=0.1),
        **config,
        wrap_runner=remote,
    )
    assert got == expected and len(crossings) == engine.stats.steps
    assert engine.stats.preemptions > 0 and engine.stats.cached_prompt_tokens > 0
