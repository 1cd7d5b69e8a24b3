"""Requests made lazily: the engine takes them from an iterator as the scheduler has room,
holding at most ``SchedulerConfig.lookahead`` waiting, and decides exactly as if every
request had been queued at the start; shared segments live until their announced last user
is done. The engine's sizing and segment counts come from the plan's arrays."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.engine import build_engine
from batchrun.core.job.requests import RowSamples, make_requests, most_kv_tokens, segment_users
from batchrun.core.job.rows import Row
from batchrun.core.params import SamplingParams
from batchrun.core.planner.plan import build_plan
from batchrun.core.planner.prompt_tokens import PromptTokens
from batchrun.core.runner.kv_cache import KVCacheSpec
from batchrun.core.runner.model_loader import load_model
from batchrun.core.sched.block_pool import BlockPool
from batchrun.core.sched.config import SchedulerConfig
from batchrun.core.sched.segments import SharedPrefixes

SYSTEM = "You answer from the document, briefly and plainly."
DOCS = ["The mill ground oats until 1902.", "The ferry leaves at seven.", "Bees keep the orchard."]
QUESTIONS = ["When?", "What is it?", "Who keeps it?", "Say more.", "Why?"]


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(tiny_llama, device="cpu", dtype="float32")


def job(tokenizer):
    """15 shared-prefix rows (system > document > question); every fourth sampled twice."""
    texts = [f"{SYSTEM}\n{doc}\nQ: {q}\nA:" for doc in DOCS for q in QUESTIONS]
    tokens = PromptTokens.from_lists([tokenizer(t)["input_ids"] for t in texts])
    rows = [
        Row(i, str(i), f"row {i}", params=SamplingParams(max_tokens=3 + i % 4, n=2 if i % 4 == 0 else 1))
        for i in range(len(texts))
    ]
    max_tokens = np.array([row.params.max_tokens for row in rows])
    plan = build_plan(tokens, np.ones(len(rows), bool), max_tokens, block_size=4)
    return rows, tokens, plan


def test_segment_users_and_kv_size_from_arrays_equal_the_materialised_requests(tiny_llama):
    from transformers import AutoTokenizer

    rows, tokens, plan = job(AutoTokenizer.from_pretrained(tiny_llama))
    requests = list(make_requests(rows, tokens, plan, job_seed=0))
    counts = Counter(ref.key for r in requests for ref in r.segments)
    planned = RowSamples(rows, tokens, plan)
    users_of = segment_users(plan, planned)
    assert counts and {key: users_of(key) for key in counts} == dict(counts)
    assert any(key >= len(plan.tree) for key in counts), "no row shares its prompt between samples"
    segments = {ref.key: ref.end - ref.start for r in requests for ref in r.segments}
    own = sum(r.max_total_tokens - (r.segments[-1].end if r.segments else 0) + 4 for r in requests)
    assert most_kv_tokens(plan, planned) == own + sum(segments.values())


def test_an_announced_segment_outlives_users_that_finish_before_the_last_one_registers():
    pool = BlockPool(4)
    prefixes = SharedPrefixes(pool)
    prefixes.announce({7: 3}.__getitem__)
    prefixes.register(7, 0, 8)
    prefixes.segments[7].block_ids = [pool.allocate(), pool.allocate()]
    prefixes.user_finished((7,))  # the first user is done before the others are even taken
    prefixes.register(7, 0, 8)
    prefixes.user_finished((7,))
    assert pool.num_used == 2, "the segment's blocks went before its announced last user"
    prefixes.register(7, 0, 8)
    with pytest.raises(ValueError, match="more users than the 3 announced"):
        prefixes.register(7, 0, 8)
    prefixes.user_finished((7,))
    assert pool.num_used == 0 and not prefixes.segments


def trace(loaded, rows, tokens, plan, config, lazy):
    """Run the plan's requests; every step's message as plain values, the completions, the
    engine, and (lazy) how many requests had been taken from the iterator at each step."""
    engine = build_engine(loaded, config)
    steps, taken_at_step, waiting = [], [], []
    execute = engine.runner.execute

    def recorded(step):
        steps.append(
            (
                [(c.req_id, c.num_tokens) for c in step.chunks],
                [(r.req_id, r.block_ids, r.num_computed_tokens) for r in step.new_requests],
                step.finished_req_ids,
                step.preempted_req_ids,
            )
        )
        taken_at_step.append(taken[0])
        waiting.append(len(engine.scheduler.waiting))
        return execute(step)

    engine.runner.execute = recorded
    taken = [0]

    def counted():
        for request in make_requests(rows, tokens, plan, job_seed=0):
            taken[0] += 1
            yield request

    users = segment_users(plan, RowSamples(rows, tokens, plan)) if lazy else None
    done = {(c.row, c.sample_index): c.token_ids for c in engine.generate(counted(), segment_users=users)}
    assert engine.kv.num_free == engine.kv.pool.num_blocks and not engine.kv.prefixes.segments
    return steps, done, engine, taken_at_step, waiting


@pytest.mark.parametrize("tight_kv", [False, True], ids=["ample-kv", "preempting"])
def test_lazy_admission_schedules_exactly_as_the_eager_one_with_few_requests_waiting(loaded, tight_kv):
    rows, tokens, plan = job(loaded.tokenizer)
    # Tight: admission expects far less output than comes, so the pool runs dry and preempts.
    scheduler = SchedulerConfig(max_skipped=2, min_observed=1, growth_margin=0.1 if tight_kv else 1.5)
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=32, dtype=loaded.dtype, block_size=4)
    kv = (16 if tight_kv else 400) * spec.bytes_per_block
    config = EngineConfig(block_size=4, token_budget=6, kv_cache_bytes=kv, scheduler=scheduler)
    lookahead = config.scheduler_config().lookahead
    total = sum(row.params.n for row in rows)
    assert lookahead == 8 < total

    eager_steps, eager_done, eager, _, _ = trace(loaded, rows, tokens, plan, config, lazy=False)
    steps, done, engine, taken, waiting = trace(loaded, rows, tokens, plan, config, lazy=True)

    assert steps == eager_steps and done == eager_done
    counts = lambda stats: {k: v for k, v in vars(stats).items() if k != "seconds"}  # noqa: E731
    assert counts(engine.stats) == counts(eager.stats)
    assert taken[0] == lookahead, "the first step took more requests than admission can reach"
    if not tight_kv:  # preempted requests go back to the queue, beyond the lookahead
        assert max(waiting) <= lookahead
    else:
        assert engine.stats.preemptions > 0
    assert taken[-1] == total


def test_a_job_taking_requests_lazily_writes_the_same_bytes_as_one_taking_them_all(tmp_path, monkeypatch):
    """12 rows sampled twice through a queue of 4 (token budget 3 + 1 skipped): the output is
    byte for byte that of the engine taking every request at the start."""
    import shutil

    from batchrun.core.engine.engine import Engine
    from batchrun.core.job.config import JobConfig
    from batchrun.core.job.run import run_job

    from helpers import SAMPLE_JOBS, TINY_LLAMA

    src = tmp_path / "docs_qa.jsonl"
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", src)
    engine = EngineConfig(token_budget=3, scheduler=SchedulerConfig(max_skipped=1))
    sampling = {"max_tokens": 3, "n": 2, "temperature": 0.8}

    def run(out):
        run_job(
            JobConfig(
                input=src, model=TINY_LLAMA, output=out, sampling=sampling, dtype="float32", engine=engine
            )
        )
        return out.read_bytes()

    waiting: list[int] = []
    lazy_generate = Engine.generate

    def watched(self, requests, on_step=None, segment_users=None):
        assert segment_users is not None, "the job did not announce its segments' users"

        def step(stats):
            waiting.append(len(self.scheduler.waiting))
            if on_step is not None:
                on_step(stats)

        return lazy_generate(self, requests, step, segment_users)

    monkeypatch.setattr(Engine, "generate", watched)
    lazy = run(tmp_path / "lazy.jsonl")
    assert waiting and max(waiting) <= 4
    monkeypatch.setattr(
        Engine,
        "generate",
        lambda self, requests, on_step=None, segment_users=None: lazy_generate(self, requests, on_step),
    )
    assert run(tmp_path / "eager.jsonl") == lazy
