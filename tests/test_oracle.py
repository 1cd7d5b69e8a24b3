"""The correctness oracle: batchrun's greedy tokens equal transformers ``generate`` for every
row, whatever the token budget (chunked prefill), block size or KV budget."""

from __future__ import annotations

import pytest

from batchrun.core.config import EngineConfig
from batchrun.core.engine import build_engine
from batchrun.core.kv_cache import KVCacheSpec
from batchrun.core.model_loader import load_model
from batchrun.core.params import SamplingParams
from batchrun.core.request import Request

from conftest import reference_generate

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


def run_engine(loaded, prompts, max_tokens, order=None, **engine_kwargs):
    engine = build_engine(loaded, EngineConfig(**engine_kwargs))
    order = order if order is not None else range(len(prompts))
    requests = [
        Request(i, prompts[i], SamplingParams(max_tokens=max_tokens[i], ignore_eos=False)) for i in order
    ]
    done = {c.request_id: c for c in engine.generate(requests)}
    assert engine.pool.num_free == engine.pool.num_blocks, "KV blocks leaked"
    assert engine.scheduler.num_reserved == 0
    return [done[i].token_ids for i in range(len(prompts))], engine


@pytest.mark.parametrize("token_budget", [5, 64, 4096])
@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_greedy_equals_transformers_generate(loaded, workload, expected, token_budget, block_size):
    prompts, max_tokens = workload
    got, engine = run_engine(loaded, prompts, max_tokens, token_budget=token_budget, block_size=block_size)
    assert got == expected
    if token_budget == 5:
        assert engine.stats.steps > max(len(p) for p in prompts) // 5, "prompts were not chunked"


def test_oracle_holds_in_any_submission_order(loaded, workload, expected):
    prompts, max_tokens = workload
    order = list(reversed(range(len(prompts))))
    got, _ = run_engine(loaded, prompts, max_tokens, order=order, token_budget=48, block_size=4)
    assert got == expected


def test_oracle_holds_when_kv_memory_forces_admission_rounds(loaded, workload, expected):
    prompts, max_tokens = workload
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=32, dtype=loaded.dtype, block_size=8)
    # Room for the largest single request only, so requests run a few at a time.
    largest = max(len(p) + n for p, n in zip(prompts, max_tokens, strict=True))
    budget = spec.blocks_for(largest) * spec.bytes_per_block
    got, engine = run_engine(
        loaded, prompts, max_tokens, token_budget=256, block_size=8, kv_cache_bytes=budget
    )
    assert got == expected
    assert engine.pool.num_blocks == spec.blocks_for(largest)
    assert engine.stats.peak_blocks <= engine.pool.num_blocks


def test_single_row_job(loaded, workload, expected):
    prompts, max_tokens = workload
    got, _ = run_engine(loaded, prompts[:1], max_tokens[:1], token_budget=16, block_size=16)
    assert got == expected[:1]
