"""The planner: prefix tree, segments, order, groups, LRU baseline. Property-based where it fits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.core.planner import prefix_tree
from batchrun.core.planner.lru_baseline import lru_computed_tokens, lru_estimate
from batchrun.core.planner.plan import build_plan, first_level_groups
from batchrun.core.planner.prompt_tokens import PromptTokens


def plan_of(prompts, block_size=1, decode=None, runnable=None, **kwargs):
    tokens = PromptTokens.from_lists(prompts)
    runnable = tokens.lengths > 0 if runnable is None else np.asarray(runnable)
    decode = np.full(len(prompts), 8) if decode is None else np.asarray(decode)
    return build_plan(tokens, runnable, decode, block_size, **kwargs), tokens


def users_of(plan, segment):
    """Rows whose chain of segments passes through ``segment``."""
    tree = plan.tree
    return [r for r, s in enumerate(tree.row_segment) if s >= 0 and segment in tree.path(s)]


# Prompts over a 3-token alphabet built from a few shared stems, so sharing is dense.
stems = st.lists(st.integers(0, 2), max_size=10)
batches = st.lists(stems, min_size=1, max_size=4).flatmap(
    lambda roots: st.lists(
        st.tuples(st.sampled_from(roots), st.lists(st.integers(0, 2), max_size=5)).map(
            lambda pair: pair[0] + pair[1]
        ),
        min_size=1,
        max_size=14,
    )
)


@settings(max_examples=150, deadline=None)
@given(prompts=batches, block_size=st.integers(1, 4))
def test_segments_are_maximal_block_aligned_common_prefixes(prompts, block_size):
    plan, tokens = plan_of(prompts, block_size)
    tree = plan.tree
    for s in range(len(tree)):
        users = users_of(plan, s)
        assert len(users) == tree.users[s] >= 2
        head = prompts[users[0]][: tree.end[s]]
        assert all(prompts[u][: tree.end[s]] == head for u in users)  # a common prefix of every user
        assert all(tree.end[s] <= len(prompts[u]) - 1 for u in users)  # never a user's last token
        assert tree.start[s] % block_size == 0 and tree.end[s] % block_size == 0
        assert tree.start[s] == (tree.end[tree.parent[s]] if tree.parent[s] >= 0 else 0)
        assert tree.start[s] < tree.end[s]
        if tree.parent[s] >= 0:
            assert tree.users[s] < tree.users[tree.parent[s]]
            assert tree.depth[s] == tree.depth[tree.parent[s]] + 1
        assert tree.first_row[s] == min(users)

    # Maximal: each row shares exactly the longest aligned prefix another row also has.
    for r, p in enumerate(prompts):
        cap = (max(len(p) - 1, 0) // block_size) * block_size
        best = 0
        for j in range(block_size, cap + 1, block_size):
            others = [q for i, q in enumerate(prompts) if i != r and len(q) - 1 >= j and q[:j] == p[:j]]
            if others:
                best = j
        assert tree.shared_length()[r] == best


@settings(max_examples=150, deadline=None)
@given(prompts=batches)
def test_block_size_one_computes_the_distinct_trie_nodes(prompts):
    plan, tokens = plan_of(prompts, block_size=1)
    # Every prompt computes its own last token (its logits start the generation); all
    # tokens before it are shared exactly as the trie shares them.
    trie = {tuple(p[:j]) for p in prompts for j in range(1, len(p))}
    runnable = sum(1 for p in prompts if p)
    assert plan.summary.computed_tokens == len(trie) + runnable
    full_trie = {tuple(p[:j]) for p in prompts for j in range(1, len(p) + 1)}
    prefix_free = not any(
        i != k and p and q[: len(p)] == p for i, p in enumerate(prompts) for k, q in enumerate(prompts)
    )
    if prefix_free:  # then that is the optimum: the number of distinct nodes of the token trie
        assert plan.summary.computed_tokens == len(full_trie)


@settings(max_examples=150, deadline=None)
@given(prompts=batches, block_size=st.integers(1, 3), decode=st.lists(st.integers(1, 50), min_size=14))
def test_order_is_a_depth_first_permutation(prompts, block_size, decode):
    plan, tokens = plan_of(prompts, block_size, decode=decode[: len(prompts)])
    runnable = [i for i, p in enumerate(prompts) if p]
    assert sorted(plan.order.tolist()) == runnable  # every runnable row exactly once
    position = {r: k for k, r in enumerate(plan.order.tolist())}
    for s in range(len(plan.tree)):  # a segment's users run back to back: its KV dies early
        spots = sorted(position[u] for u in users_of(plan, s))
        assert spots[-1] - spots[0] == len(spots) - 1
    again, _ = plan_of(prompts, block_size, decode=decode[: len(prompts)])
    assert np.array_equal(plan.order, again.order)  # deterministic
    assert np.array_equal(plan.tree.row_segment, again.tree.row_segment)


@settings(max_examples=100, deadline=None)
@given(prompts=batches, block_size=st.integers(1, 3))
def test_first_level_groups_follow_the_gain_rule(prompts, block_size):
    plan, _ = plan_of(prompts, block_size)
    tree, group = plan.tree, plan.group_of_segment
    for s in range(len(tree)):
        if tree.parent[s] < 0:
            assert group[s] == s  # top-level segments always head a group
            continue
        inherited = group[tree.parent[s]]
        prefix = tree.end[inherited]
        gain = (tree.users[s] - 1) * (tree.end[s] - prefix) - prefix
        assert group[s] == (s if gain > 0 else inherited)


def test_gain_rule_on_a_known_tree():
    # system (8 tokens, 6 rows) > two documents (8 tokens, 3 rows each) > questions.
    system, doc_a, doc_b = [1] * 8, [2] * 8, [3] * 8
    prompts = [system + doc + [q, 9] for doc in (doc_a, doc_b) for q in (4, 5, 6)]
    plan, _ = plan_of(prompts, block_size=4)
    tree = plan.tree
    assert tree.end.tolist() == [8, 16, 16] and tree.users.tolist() == [6, 3, 3]
    # gain(doc) = (3 - 1) * (16 - 8) - 8 = 8 > 0: each document heads its own group.
    assert first_level_groups(tree).tolist() == [0, 1, 2]
    assert plan.summary.groups == 2


def test_decode_heavy_work_goes_first():
    system = [7] * 8
    prompts = [system + [1, 1, 1, 1, 5], system + [2, 2, 2, 2, 5], [3, 3, 3], [4] * 30]
    decode = [10, 100, 5, 5]
    plan, _ = plan_of(prompts, block_size=4, decode=decode)
    # Root children: the system segment (ratio 110 / (8 + 5 + 5)) beats the loose rows
    # (5/3 and 5/30); inside it the 100-token row goes before the 10-token one.
    assert plan.order.tolist() == [1, 0, 2, 3]


@pytest.mark.parametrize(
    "prompts, computed",
    [
        ([[5, 6, 7, 8]] * 3, 4 + 1 + 1),  # identical: one full prefill, then the last token each
        ([[5, 6, 7], [5, 6, 7, 8, 9]], 2 + 1 + 3),  # a prompt that is a prefix of another
        ([[5], [5], [6]], 3),  # one-token prompts: nothing to share
        ([[1, 2, 3, 4, 5]], 5),  # a single row
    ],
)
def test_edge_cases(prompts, computed):
    plan, _ = plan_of(prompts, block_size=1)
    assert plan.summary.computed_tokens == computed
    assert sorted(plan.order.tolist()) == list(range(len(prompts)))


def test_rows_that_cannot_run_are_left_out():
    plan, _ = plan_of([[1, 2, 3], [1, 2, 3], [1, 2, 4]], runnable=[True, False, True])
    assert sorted(plan.order.tolist()) == [0, 2]
    assert plan.tree.row_segment[1] == -1
    assert plan.summary.runnable_rows == 2 and plan.summary.prompt_tokens == 6


def test_no_sharing_and_input_order_switch_the_two_ideas_off():
    prompts = [[9, 9, 9, 1], [8], [9, 9, 9, 2]]
    plan, _ = plan_of(prompts, sharing=False, order="input")
    assert plan.order.tolist() == [0, 1, 2]
    assert len(plan.tree) == 0 and plan.summary.computed_tokens == plan.summary.prompt_tokens


def test_hash_collisions_fall_back_to_exact_grouping(monkeypatch):
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9, 9], [7, 2, 3, 4, 5], [7, 2, 3, 4, 6]]
    honest, _ = plan_of(prompts, block_size=2)
    monkeypatch.setattr(prefix_tree, "_hash_rows", lambda blocks, parent: np.zeros(len(blocks), np.uint64))
    colliding, _ = plan_of(prompts, block_size=2)
    for name in ("parent", "start", "end", "users", "row_segment"):
        assert np.array_equal(getattr(honest.tree, name), getattr(colliding.tree, name))
    assert colliding.summary.computed_tokens == honest.summary.computed_tokens


def test_lru_baseline_bounds():
    prompts = [[d] * 8 + [q, 0] for d in (1, 2, 3) for q in (4, 5, 6)]
    interleaved = [prompts[i] for i in (0, 3, 6, 1, 4, 7, 2, 5, 8)]  # documents take turns
    plan, tokens = plan_of(interleaved, block_size=4)
    runnable = tokens.lengths > 0
    total = int(tokens.lengths.sum())
    # An unbounded LRU cache reuses everything the plan shares; a cache of one block nothing.
    assert lru_computed_tokens(plan.tree, tokens.lengths, runnable, 10**6) == plan.summary.computed_tokens
    assert lru_computed_tokens(plan.tree, tokens.lengths, runnable, 1) == total
    # Room for two documents while three take turns: LRU evicts each one just before its
    # next user arrives (the failure batchrun's plan avoids), so it computes everything.
    assert lru_computed_tokens(plan.tree, tokens.lengths, runnable, 4) == total
    assert plan.summary.computed_tokens == total - 6 * 8


def test_lru_estimate_is_exact_up_to_its_window_and_extrapolates_past_it():
    # 6 documents take turns through a cache with room for 3: past the cold start every row
    # computes all of its tokens (each document is evicted before its next user).
    prompts = [[d] * 8 + [q, 0] for q in range(20) for d in range(1, 7)]
    plan, tokens = plan_of(prompts, block_size=4)
    runnable = tokens.lengths > 0
    exact = lru_computed_tokens(plan.tree, tokens.lengths, runnable, 6)
    assert lru_estimate(plan.tree, tokens.lengths, runnable, 6) == (exact, len(prompts))
    estimate, simulated = lru_estimate(plan.tree, tokens.lengths, runnable, 6, max_rows=40)
    assert simulated == 40 and estimate == exact == int(tokens.lengths.sum())
    # A cache that holds every document: the warm half computes only each row's own tail.
    roomy, _ = lru_estimate(plan.tree, tokens.lengths, runnable, 10**6, max_rows=40)
    assert roomy == lru_computed_tokens(plan.tree, tokens.lengths, runnable, 10**6)
