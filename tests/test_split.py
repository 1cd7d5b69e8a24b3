"""Work units for scale-out (core/distributed/split.py): rows cut only at prefix-group
boundaries, each row once, and the prompt tokens computed across units close to one process's.
No Ray needed."""

from __future__ import annotations

import json
import shutil

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.core.distributed.split import lpt_loads, split_plan
from batchrun.core.planner.plan import build_plan
from batchrun.core.planner.prompt_tokens import PromptTokens

from helpers import SAMPLE_JOBS, run_cli


def plan_of(prompts, block_size=1, decode=4):
    tokens = PromptTokens.from_lists(prompts)
    decode = np.full(len(prompts), decode)
    return build_plan(tokens, np.ones(len(prompts), bool), decode, block_size), tokens, decode


def subtree_rows(tree, segment):
    return [r for r, s in enumerate(tree.row_segment) if s >= 0 and segment in tree.path(int(s))]


def subtree_cost(tree, tokens, decode, rows):
    """Cost of running ``rows`` alone: every segment on their paths once, own tokens, outputs."""
    segments = {s for r in rows if tree.row_segment[r] >= 0 for s in tree.path(int(tree.row_segment[r]))}
    own = sum(len(tokens[r]) - int(tree.shared_length()[r]) for r in rows)
    return sum(int(tree.lengths[s]) for s in segments) + own + int(decode[rows].sum())


stems = st.lists(st.integers(0, 2), min_size=1, max_size=12)
batches = st.lists(stems, min_size=1, max_size=4).flatmap(
    lambda roots: st.lists(
        st.tuples(st.sampled_from(roots), st.lists(st.integers(0, 2), min_size=1, max_size=6)).map(
            lambda pair: pair[0] + pair[1]
        ),
        min_size=1,
        max_size=24,
    )
)


@settings(max_examples=120, deadline=None)
@given(prompts=batches, block_size=st.integers(1, 3), workers=st.integers(1, 4))
def test_units_cover_every_row_once_and_split_only_oversized_groups(prompts, block_size, workers):
    plan, tokens, decode = plan_of(prompts, block_size)
    split = split_plan(plan, tokens.lengths, decode, workers)
    tree = plan.tree
    rows = np.concatenate([u.rows for u in split.units])
    assert sorted(rows.tolist()) == sorted(plan.order.tolist())  # every planned row exactly once
    position = {r: i for i, r in enumerate(plan.order.tolist())}
    for unit in split.units:
        assert [position[r] for r in unit.rows.tolist()] == sorted(position[r] for r in unit.rows.tolist())
        assert unit.prompt_tokens + unit.output_tokens == subtree_cost(tree, tokens, decode, unit.rows)
    assert split.computed_tokens >= plan.summary.computed_tokens
    assert [u.cost for u in split.units] == sorted((u.cost for u in split.units), reverse=True)
    unit_of = split.unit_of_row(len(prompts))
    for s in range(len(tree)):
        members = subtree_rows(tree, s)
        whole = subtree_cost(tree, tokens, decode, members)  # its prefix above included
        if s in split.split_segments.tolist():  # split only when over a fair share
            assert whole > split.fair_share
        if len({int(unit_of[r]) for r in members}) > 1:  # rows apart: it or an ancestor was split
            assert any(a in split.split_segments.tolist() for a in tree.path(s))
        if tree.parent[s] < 0 and whole <= split.fair_share:
            assert len({int(unit_of[r]) for r in members}) == 1  # a top-level group within a share


def test_one_system_prompt_over_many_rows_is_split_and_each_piece_computes_it_once():
    system = list(range(100, 164))  # 64 shared tokens
    prompts = [system + [1000 + i, 7, 8] for i in range(40)]
    plan, tokens, decode = plan_of(prompts, block_size=16)
    split = split_plan(plan, tokens.lengths, decode, workers=4)
    assert split.split_segments.tolist() == [0]
    pieces = len(split.units)
    assert pieces >= 4
    # each unit computes the 64-token prompt once: scale-out costs (pieces - 1) * 64 tokens
    assert split.computed_tokens == plan.summary.computed_tokens + (pieces - 1) * 64
    loads = split.balance()
    assert max(loads) <= 1.5 * (sum(loads) / 4)


def test_documents_stay_whole_when_each_is_within_a_fair_share():
    rng = np.random.default_rng(0)
    docs = [rng.integers(200, 900, size=48).tolist() for _ in range(6)]
    prompts = [docs[d] + [10 + q, 11, 12] for d in range(6) for q in range(5)]
    plan, tokens, decode = plan_of(prompts, block_size=16)
    split = split_plan(plan, tokens.lengths, decode, workers=2)
    assert len(split.split_segments) == 0
    unit_of = split.unit_of_row(len(prompts))
    for d in range(6):
        assert len(set(unit_of[d * 5 : d * 5 + 5].tolist())) == 1
    assert split.computed_tokens == plan.summary.computed_tokens  # nothing computed twice


def test_lpt_gives_each_cost_to_the_least_loaded_worker():
    assert lpt_loads([7, 5, 4, 3, 1], 2) == [10, 10]
    assert lpt_loads([5], 3) == [5, 0, 0]


def test_plan_shows_how_workers_would_split_the_job(capsys, tmp_path):
    src = tmp_path / "docs.jsonl"
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", src)
    code, out, _ = run_cli(capsys, "plan", src, "--workers", "2", "--json")
    assert code == 0
    plan = json.loads(out)
    split = plan["workers"]
    assert split["workers"] == 2 and split["units"] >= 2 and len(split["worker_costs"]) == 2
    assert split["computed_tokens"] >= plan["computed_tokens"] and 0 < split["balance"] <= 1
    code, out, _ = run_cli(capsys, "plan", src, "--workers", "2")
    assert code == 0 and "split over 2 workers" in out and "balance" in out
