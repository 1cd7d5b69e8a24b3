"""Triton kernels (kernels/triton/) against dense float64 references, on random packed steps.

Without a GPU the kernels run in Triton's interpreter on CPU; ``TRITON_INTERPRET`` must be
set before the kernel modules are imported (``triton.jit`` reads it when it decorates), so
it is set here, at import, and only when there is no CUDA device. Shapes stay small: the
whole file runs in about a minute on 2 CPU cores.

Every cache is poisoned where the kernels must not read: the null block that pads the
block tables, the slots past each sequence's length in its last block, and (for
``kv_start``) the skipped keys all hold NaN, so a single stray load turns an output NaN.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from batchrun.kernels import cascade, torch_ref  # noqa: E402
from batchrun.kernels.triton import (  # noqa: E402
    CAPABILITIES,
    merge_attention,
    merge_attention_into,
    paged_attention,
    prefix_attention,
    store_kv,
    supported_block_size,
    supported_head_dim,
)
from batchrun.kernels.triton.split_kv import choose_num_splits, splits_for  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NULL = 0  # the null block id padding every block table
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Seq(NamedTuple):
    q_len: int  # new tokens this step (1 = a decode)
    kv_len: int  # keys in the cache after this step, >= q_len
    group: int | None = None  # first-level group it belongs to (its keys start with the prefix)


class Step(NamedTuple):
    """A packed step over a paged cache, plus the dense keys the reference reads."""

    query: torch.Tensor  # (T, Hq, D)
    k_cache: torch.Tensor  # (num_blocks, block_size, Hkv, D), NaN wherever nothing may be read
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # (S + 1,) int32
    seq_lens: torch.Tensor  # (S,) int32
    block_tables: torch.Tensor  # (S, W) int32, padded with NULL
    keys: list[torch.Tensor]  # per sequence (kv_len, Hkv, D), clean, float64
    values: list[torch.Tensor]
    group_rows: torch.Tensor  # (Tg,) int32: query rows of each group's members, group by group
    cu_group_rows: torch.Tensor  # (NG + 1,) int32
    group_tables: torch.Tensor  # (NG, Wg) int32, padded with NULL
    group_prefix_len: torch.Tensor  # (NG,) int32
    prefix_of: list[int]  # per sequence: its group's prefix length, or 0


def build_step(seqs, prefixes, *, block_size, num_kv_heads, group, head_dim, dtype, seed) -> Step:
    """Random keys; each group's members share the full blocks of its prefix (a partial last
    prefix block is copied into every member's own block, as copy-on-write would)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    prefix_k = [rand(p, num_kv_heads, head_dim) for p in prefixes]
    prefix_v = [rand(p, num_kv_heads, head_dim) for p in prefixes]
    keys, values, prefix_of = [], [], []
    for s in seqs:
        p = prefixes[s.group] if s.group is not None else 0
        keys.append(
            torch.cat(
                [
                    prefix_k[s.group][:p] if p else rand(0, num_kv_heads, head_dim),
                    rand(s.kv_len - p, num_kv_heads, head_dim),
                ]
            )
        )
        values.append(
            torch.cat(
                [
                    prefix_v[s.group][:p] if p else rand(0, num_kv_heads, head_dim),
                    rand(s.kv_len - p, num_kv_heads, head_dim),
                ]
            )
        )
        prefix_of.append(p)

    # Physical blocks in shuffled order; block NULL stays NaN.
    shared_blocks = [p // block_size for p in prefixes]
    own_blocks = [
        -(-s.kv_len // block_size) - (shared_blocks[s.group] if s.group is not None else 0) for s in seqs
    ]
    num_blocks = 1 + sum(shared_blocks) + sum(own_blocks)
    ids = iter((torch.randperm(num_blocks - 1, generator=gen) + 1).tolist())
    group_blocks = [[next(ids) for _ in range(n)] for n in shared_blocks]
    tables = []
    for s, n in zip(seqs, own_blocks, strict=True):
        tables.append((group_blocks[s.group] if s.group is not None else []) + [next(ids) for _ in range(n)])

    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=torch.float64)
    v_cache = k_cache.clone()
    for table, k, v in zip(tables, keys, values, strict=True):
        for pos in range(k.shape[0]):
            k_cache[table[pos // block_size], pos % block_size] = k[pos]
            v_cache[table[pos // block_size], pos % block_size] = v[pos]

    width = max(len(t) for t in tables) + 2  # always some padding
    block_tables = torch.tensor([t + [NULL] * (width - len(t)) for t in tables], dtype=torch.int32)
    q_lens = [s.q_len for s in seqs]
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    query = rand(cu[-1], num_kv_heads * group, head_dim)

    rows: list[int] = []
    cu_rows = [0]
    gwidth = max([len(b) for b in group_blocks] + [1]) + 1
    group_tables = []
    for g, p in enumerate(prefixes):
        members = [i for i, s in enumerate(seqs) if s.group == g]
        for i in members:
            rows.extend(range(cu[i], cu[i + 1]))
        cu_rows.append(len(rows))
        # the group's table: the shared blocks, then (partial prefix) the first member's copy
        table = list(group_blocks[g])
        if p % block_size and members:
            table.append(tables[members[0]][len(table)])
        group_tables.append(table + [NULL] * (gwidth - len(table)))

    def dev(t, dt=None):
        return t.to(device=DEVICE, dtype=dt or dtype)

    i32 = torch.int32
    return Step(
        dev(query),
        dev(k_cache),
        dev(v_cache),
        dev(torch.tensor(cu), i32),
        dev(torch.tensor([s.kv_len for s in seqs]), i32),
        dev(block_tables, i32),
        [k.to(dtype).double() for k in keys],
        [v.to(dtype).double() for v in values],
        dev(torch.tensor(rows), i32),
        dev(torch.tensor(cu_rows), i32),
        dev(torch.tensor(group_tables), i32),
        dev(torch.tensor(prefixes), i32),
        prefix_of,
    )


def dense_attention(q, k, v, visible, scale, softcap=None):
    """float64 reference: q (Q, Hq, D), k / v (L, Hkv, D), visible (Q, L) -> out (Q, Hq, D), lse (Q, Hq)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, L, D)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    s = torch.matmul(q.double().transpose(0, 1), k.transpose(1, 2)) * scale  # (Hq, Q, L)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (Hq, Q)
    probs = torch.where(torch.isinf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))
    return torch.matmul(probs, v).transpose(0, 1), lse.transpose(0, 1)


def reference_paged(step: Step, scale, *, kv_start=None, causal=True, softcap=None, window=None):
    """Per sequence, dense attention over its clean keys; (T, Hq, D), (T, Hq) float64."""
    outs, lses = [], []
    cu = step.cu_seqlens_q.tolist()
    for i, (k, v) in enumerate(zip(step.keys, step.values, strict=True)):
        q = step.query[cu[i] : cu[i + 1]].cpu()
        q_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0])[:, None]
        k_pos = torch.arange(k.shape[0])[None, :]
        visible = k_pos >= (kv_start[i] if kv_start is not None else 0)
        visible = visible & (k_pos <= q_pos) if causal else visible.expand(q.shape[0], -1)
        if window:
            visible = visible & (k_pos > q_pos - window)
        out, lse = dense_attention(q, k, v, visible, scale, softcap)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def run_paged(step: Step, scale, **options):
    """paged_attention over the whole step."""
    args = (step.cu_seqlens_q, step.seq_lens, step.block_tables)
    return paged_attention(step.query, step.k_cache, step.v_cache, *args, scale, **options)


def run_prefix(step: Step, scale, softcap=None):
    """prefix_attention for every group of the step."""
    groups = (step.group_rows, step.cu_group_rows, step.group_tables, step.group_prefix_len)
    return prefix_attention(step.query, step.k_cache, step.v_cache, *groups, scale, softcap)


def assert_close(got, want, dtype):
    torch.testing.assert_close(got.cpu().double(), want.double(), **TOL[dtype], equal_nan=False)


def assert_lse_close(got, want):
    """LSEs: the same -inf entries, close elsewhere."""
    got = got.cpu().double()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def poison(step: Step, kv_start) -> None:
    """NaN over the keys before kv_start (they must be skipped, not masked)."""
    for i, start in enumerate(kv_start):
        for pos in range(start):
            block = int(step.block_tables[i, pos // step.k_cache.shape[1]])
            step.k_cache[block, pos % step.k_cache.shape[1]] = float("nan")
            step.v_cache[block, pos % step.k_cache.shape[1]] = float("nan")


# -- random steps ----------------------------------------------------------------------------


@st.composite
def packed_steps(draw, max_seqs=5, max_len=150):
    """Sequences of a packed step: decodes and prefill chunks mixed, any lengths."""
    seqs = []
    for _ in range(draw(st.integers(1, max_seqs))):
        kv_len = draw(st.integers(1, max_len))
        q_len = 1 if draw(st.booleans()) else draw(st.integers(1, min(kv_len, 40)))
        seqs.append(Seq(q_len, kv_len))
    return seqs


layouts = st.fixed_dictionaries(
    {
        "block_size": st.sampled_from([16, 32, 64]),
        "num_kv_heads": st.sampled_from([1, 2]),
        "group": st.sampled_from([1, 2, 4, 8]),
    }
)


@FEW
@given(
    seqs=packed_steps(),
    layout=layouts,
    seed=st.integers(0, 2**16),
    softcap=st.sampled_from([None, 4.0]),
    window=st.sampled_from([None, 1, 7, 40]),
    causal=st.booleans(),
    use_kv_start=st.booleans(),
)
def test_paged_attention_matches_dense(seqs, layout, seed, softcap, window, causal, use_kv_start):
    step = build_step(seqs, [], head_dim=32, dtype=torch.float32, seed=seed, **layout)
    kv_start = None
    if use_kv_start:  # anywhere, past some queries too (those rows see nothing)
        gen = torch.Generator().manual_seed(seed)
        kv_start = [int(torch.randint(0, s.kv_len + 1, (1,), generator=gen)) for s in seqs]
        poison(step, kv_start)
    out, lse = run_paged(
        step,
        0.2,
        kv_start=torch.tensor(kv_start, dtype=torch.int32, device=DEVICE) if use_kv_start else None,
        causal=causal,
        softcap=softcap,
        sliding_window=window,
        return_lse=True,
    )
    want, want_lse = reference_paged(
        step, 0.2, kv_start=kv_start, causal=causal, softcap=softcap, window=window
    )
    assert_close(out, want, torch.float32)
    assert_lse_close(lse, want_lse)


@FEW
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    layout=layouts,
    prefix_tokens=st.lists(st.integers(0, 100), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
    softcap=st.sampled_from([None, 4.0]),
    data=st.data(),
)
def test_prefix_attention_matches_dense(sizes, layout, prefix_tokens, seed, softcap, data):
    prefixes = prefix_tokens[: len(sizes)]  # some fill their last block, most do not
    seqs = [
        Seq(q, p + q + data.draw(st.integers(0, 30)), g)
        for g, (n, p) in enumerate(zip(sizes, prefixes, strict=True))
        for q in data.draw(st.lists(st.sampled_from([1, 1, 3, 17]), min_size=n, max_size=n))
    ]
    step = build_step(seqs, prefixes, head_dim=32, dtype=torch.float32, seed=seed, **layout)
    for g, p in enumerate(prefixes):  # nothing past the prefix may be read through the group's table
        bs = layout["block_size"]
        if p % bs:
            block = int(step.group_tables[g, p // bs])
            step.k_cache[block, p % bs :] = float("nan")
            step.v_cache[block, p % bs :] = float("nan")
    out, lse = run_prefix(step, 0.2, softcap)
    cu = step.cu_group_rows.tolist()
    for g, p in enumerate(prefixes):
        members = [i for i, s in enumerate(seqs) if s.group == g]
        q = step.query[step.group_rows[cu[g] : cu[g + 1]].long()].cpu()
        k, v = step.keys[members[0]][:p], step.values[members[0]][:p]
        want, want_lse = dense_attention(q, k, v, torch.ones(q.shape[0], p, dtype=torch.bool), 0.2, softcap)
        assert_close(out[cu[g] : cu[g + 1]], want, torch.float32)
        assert_lse_close(lse[cu[g] : cu[g + 1]], want_lse)


def cascade_step(step: Step, scale, softcap=None):
    """Prefix part for every group + own-suffix part for everything + merge, as a backend would."""
    kv_start = torch.tensor(step.prefix_of, dtype=torch.int32, device=DEVICE)
    out, lse = run_paged(step, scale, kv_start=kv_start, softcap=softcap, return_lse=True)
    o_p, lse_p = run_prefix(step, scale, softcap)
    merge_attention_into(out, lse, step.group_rows, o_p, lse_p)
    return out, lse


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.tuples(st.integers(1, 32), st.integers(0, 6)),  # members of one or two groups
    layout=layouts,
    prefix_blocks=st.lists(st.integers(0, 3), min_size=2, max_size=2),
    ragged=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_cascade_equals_full_causal_attention(sizes, layout, prefix_blocks, ragged, seed, data):
    sizes = [n for n in sizes if n]
    bs = layout["block_size"]
    prefixes = [n * bs - (5 if ragged and n else 0) for n in prefix_blocks[: len(sizes)]]
    seqs = [
        Seq(q, p + q + data.draw(st.integers(0, 20)), g)
        for g, (n, p) in enumerate(zip(sizes, prefixes, strict=True))
        for q in data.draw(st.lists(st.sampled_from([1, 1, 1, 6]), min_size=n, max_size=n))
    ]
    seqs += data.draw(packed_steps(max_seqs=2, max_len=60))  # sequences outside any group
    step = build_step(seqs, prefixes, head_dim=32, dtype=torch.float32, seed=seed, **layout)
    out, lse = cascade_step(step, 0.2)
    full, full_lse = run_paged(step, 0.2, return_lse=True)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)
    want, _ = reference_paged(step, 0.2)
    assert_close(out, want, torch.float32)


# -- dtypes, head dims, GQA ratios ------------------------------------------------------------


MIXED = [Seq(1, 1), Seq(1, 70), Seq(20, 20), Seq(9, 45), Seq(1, 33, 0), Seq(4, 50, 0), Seq(1, 40, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 48, 80, 96])  # the last three padded, masked
def test_dtypes_and_head_dims(dtype, head_dim):
    step = build_step(
        MIXED, [32], block_size=16, num_kv_heads=2, group=4, head_dim=head_dim, dtype=dtype, seed=head_dim
    )
    scale = head_dim**-0.5
    want, want_lse = reference_paged(step, scale, softcap=30.0)
    out = run_paged(step, scale, softcap=30.0)
    assert out.dtype == dtype
    assert_close(out, want, dtype)
    out, lse = cascade_step(step, scale, softcap=30.0)
    assert_close(out, want, dtype)
    torch.testing.assert_close(
        lse.cpu().double(), want_lse, atol=1e-3 if dtype != torch.float32 else 1e-5, rtol=1e-3
    )


@pytest.mark.parametrize("group", [3, 16])
def test_gqa_groups_that_are_not_small_powers_of_two(group):
    step = build_step(
        MIXED, [16], block_size=32, num_kv_heads=1, group=group, head_dim=32, dtype=torch.float32, seed=group
    )
    want, _ = reference_paged(step, 0.3, window=25)
    out = run_paged(step, 0.3, sliding_window=25)
    assert_close(out, want, torch.float32)
    assert_close(cascade_step(step, 0.3)[0], reference_paged(step, 0.3)[0], torch.float32)


def test_agrees_with_the_torch_reference():
    """The project's oracle, ``torch_ref.attend``, sequence by sequence on the same step."""
    seqs = [Seq(1, 50), Seq(12, 12), Seq(1, 17), Seq(5, 70)]
    step = build_step(
        seqs, [], block_size=16, num_kv_heads=2, group=2, head_dim=32, dtype=torch.float32, seed=7
    )
    cu = step.cu_seqlens_q.tolist()
    for softcap, window in [(None, None), (20.0, 9)]:
        got = run_paged(step, 0.25, softcap=softcap, sliding_window=window, max_q_len=12)
        for i, (k, v) in enumerate(zip(step.keys, step.values, strict=True)):
            q = step.query[cu[i] : cu[i + 1]].cpu()
            want = torch_ref.attend(q, k.float(), v.float(), 0.25, softcap, window)
            torch.testing.assert_close(got[cu[i] : cu[i + 1]].cpu(), want, atol=1e-5, rtol=1e-5)


# -- split-KV ------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seqs=packed_steps(max_seqs=3, max_len=300),
    layout=layouts,
    num_splits=st.sampled_from([2, 3, 5]),
    seed=st.integers(0, 2**16),
    softcap=st.sampled_from([None, 4.0]),
    window=st.sampled_from([None, 7, 100]),
    causal=st.booleans(),
    use_kv_start=st.booleans(),
)
def test_split_kv_matches_dense(seqs, layout, num_splits, seed, softcap, window, causal, use_kv_start):
    """Any number of splits, including more splits than a sequence has key tiles (the empty
    ones must weigh nothing), a kv_start that skips the first splits' keys, and windows."""
    step = build_step(seqs, [], head_dim=32, dtype=torch.float32, seed=seed, **layout)
    kv_start = None
    if use_kv_start:
        gen = torch.Generator().manual_seed(seed)
        kv_start = [int(torch.randint(0, s.kv_len + 1, (1,), generator=gen)) for s in seqs]
        poison(step, kv_start)
    options = {"causal": causal, "softcap": softcap, "sliding_window": window, "return_lse": True}
    if use_kv_start:
        options["kv_start"] = torch.tensor(kv_start, dtype=torch.int32, device=DEVICE)
    out, lse = run_paged(step, 0.2, num_splits=num_splits, **options)
    want, want_lse = reference_paged(
        step, 0.2, kv_start=kv_start, causal=causal, softcap=softcap, window=window
    )
    assert_close(out, want, torch.float32)
    assert_lse_close(lse, want_lse)
    unsplit, unsplit_lse = run_paged(step, 0.2, num_splits=1, **options)
    torch.testing.assert_close(out, unsplit, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, unsplit_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_splits, head_dim", [(2, 32), (4, 32), (16, 32), (4, 96)])
def test_split_prefix_attention_matches_dense(num_splits, head_dim):
    """Two groups, long and short prefixes (one ragged), split into runs of key tiles (the
    split reduce with a padded head dim too)."""
    prefixes = [300, 37]
    seqs = [Seq(1, 305, 0), Seq(6, 320, 0), Seq(1, 301, 0), Seq(1, 40, 1), Seq(3, 45, 1)]
    step = build_step(
        seqs,
        prefixes,
        block_size=16,
        num_kv_heads=2,
        group=4,
        head_dim=head_dim,
        dtype=torch.float32,
        seed=11,
    )
    groups = (step.group_rows, step.cu_group_rows, step.group_tables, step.group_prefix_len)
    out, lse = prefix_attention(
        step.query, step.k_cache, step.v_cache, *groups, 0.2, 4.0, num_splits=num_splits
    )
    cu = step.cu_group_rows.tolist()
    for g, p in enumerate(prefixes):
        member = next(i for i, s in enumerate(seqs) if s.group == g)
        q = step.query[step.group_rows[cu[g] : cu[g + 1]].long()].cpu()
        visible = torch.ones(q.shape[0], p, dtype=torch.bool)
        want, want_lse = dense_attention(q, step.keys[member][:p], step.values[member][:p], visible, 0.2, 4.0)
        assert_close(out[cu[g] : cu[g + 1]], want, torch.float32)
        assert_lse_close(lse[cu[g] : cu[g + 1]], want_lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_kv_in_half_precision(dtype):
    """Partials stay fp32; the output comes back in the query dtype, within the unsplit's tolerance."""
    seqs = [Seq(1, 400), Seq(1, 130), Seq(5, 260, 0), Seq(1, 250, 0)]
    step = build_step(seqs, [192], block_size=32, num_kv_heads=2, group=2, head_dim=64, dtype=dtype, seed=5)
    want, _ = reference_paged(step, 0.125)
    out = run_paged(step, 0.125, num_splits=4)
    assert out.dtype == dtype
    assert_close(out, want, dtype)


def test_how_many_splits():
    """Split only a launch that would underfill the device, never below 256 keys a split, at
    most 16, a power of two; never on CPU, nor without a hint of the longest key run."""
    assert splits_for(programs=8, longest_keys=4096, target_programs=264) == 16
    assert splits_for(programs=8, longest_keys=1024, target_programs=264) == 4
    assert splits_for(programs=64, longest_keys=8192, target_programs=264) == 4  # ceil(264 / 64) = 5
    assert splits_for(programs=300, longest_keys=8192, target_programs=264) == 1
    assert splits_for(programs=8, longest_keys=400, target_programs=264) == 1
    assert choose_num_splits(8, 8192, torch.device("cpu")) == 1
    assert choose_num_splits(8, None, torch.device("cuda")) == 1
    step = build_step(
        [Seq(1, 20)], [], block_size=16, num_kv_heads=1, group=1, head_dim=16, dtype=torch.float32, seed=1
    )
    with pytest.raises(ValueError, match="num_splits"):
        run_paged(step, 1.0, num_splits=0)


# -- merge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_the_torch_merge_and_ignores_an_empty_side(dtype):
    gen = torch.Generator().manual_seed(3)
    o_a, o_b = (torch.randn(6, 5, 32, generator=gen).to(dtype) for _ in range(2))
    lse_a, lse_b = (torch.randn(6, 5, generator=gen) * 3 for _ in range(2))
    lse_a[0], lse_b[1], lse_a[2], lse_b[2] = (float("-inf"),) * 4
    o_a[0] = float("nan")  # an empty side's output is ignored whatever it holds
    out, lse = merge_attention(*(t.to(DEVICE) for t in (o_a, lse_a, o_b, lse_b)))
    out, lse = out.cpu(), lse.cpu()
    assert torch.equal(out[0], o_b[0]) and torch.equal(lse[0], lse_b[0])
    assert torch.equal(out[1], o_a[1]) and torch.equal(lse[1], lse_a[1])
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isneginf(lse[2]).all()
    want = cascade.merge(o_a[3:], lse_a[3:], o_b[3:], lse_b[3:])
    torch.testing.assert_close(out[3:], want, **TOL[dtype])
    torch.testing.assert_close(lse[3:], torch.logaddexp(lse_a[3:], lse_b[3:]), atol=1e-6, rtol=1e-6)


def test_merge_into_updates_only_the_given_rows():
    gen = torch.Generator().manual_seed(4)
    out = torch.randn(10, 4, 16, generator=gen)
    lse = torch.randn(10, 4, generator=gen)
    rows = torch.tensor([7, 2, 5], dtype=torch.int32)
    o_p, lse_p = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 4, generator=gen)
    want_out, want_lse = out.clone(), lse.clone()
    want_out[rows.long()] = cascade.merge(out[rows.long()], lse[rows.long()], o_p, lse_p)
    want_lse[rows.long()] = torch.logaddexp(lse[rows.long()], lse_p)
    out, lse = out.to(DEVICE), lse.to(DEVICE)
    merge_attention_into(out, lse, rows.to(DEVICE), o_p.to(DEVICE), lse_p.to(DEVICE))
    torch.testing.assert_close(out.cpu(), want_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-6, rtol=1e-6)


# -- store_kv, capabilities ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, cache_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("head_dim", [32, 80])  # 80: padded to 128, the extra columns masked
def test_store_kv_writes_the_slots_and_skips_negative_ones(dtype, cache_dtype, head_dim):
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.zeros(6, 16, 2, head_dim, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    key, value = (torch.randn(5, 2, head_dim, generator=gen).to(dtype) for _ in range(2))
    slots = torch.tensor([3, 40, -1, 95, 17], dtype=torch.int64)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    torch_ref.write_kv(key[keep], value[keep], want_k, want_v, slots[keep])
    k_dev, v_dev = k_cache.to(DEVICE), v_cache.to(DEVICE)
    store_kv(key.to(DEVICE), value.to(DEVICE), k_dev, v_dev, slots.to(DEVICE))
    if dtype == cache_dtype or DEVICE == "cuda":
        assert torch.equal(k_dev.cpu(), want_k) and torch.equal(v_dev.cpu(), want_v)
    else:  # Triton 3.9's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even
        torch.testing.assert_close(k_dev.cpu(), want_k, atol=0, rtol=2**-7)
        torch.testing.assert_close(v_dev.cpu(), want_v, atol=0, rtol=2**-7)


@pytest.mark.parametrize("block_size", [1, 8, 48, 128])
def test_block_sizes_outside_the_usual_ones(block_size):
    step = build_step(
        MIXED, [32], block_size=block_size, num_kv_heads=2, group=2, head_dim=32,
        dtype=torch.float32, seed=block_size,
   )  # fmt: skip
    assert supported_block_size(block_size)
    want, _ = reference_paged(step, 0.3, window=30)
    out = run_paged(step, 0.3, sliding_window=30)
    assert_close(out, want, torch.float32)
    assert_close(cascade_step(step, 0.3)[0], reference_paged(step, 0.3)[0], torch.float32)


def test_declared_support():
    assert not supported_block_size(0)
    assert all(supported_head_dim(d) for d in (16, 32, 48, 64, 80, 96, 128, 256))
    assert not any(supported_head_dim(d) for d in (8, 12, 100, 264, 512))
    assert CAPABILITIES.paged_softcap and CAPABILITIES.paged_sliding_window and CAPABILITIES.prefix_softcap
    assert not CAPABILITIES.prefix_sliding_window and CAPABILITIES.paged_split_kv
    q, cache = torch.zeros(1, 1, 12, device=DEVICE), torch.zeros(1, 16, 1, 12, device=DEVICE)
    i32 = {"dtype": torch.int32, "device": DEVICE}
    meta = (torch.tensor([0, 1], **i32), torch.tensor([1], **i32), torch.zeros(1, 1, **i32))
    with pytest.raises(ValueError, match="head dim 12"):
        paged_attention(q, cache, cache, *meta, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(q.half(), cache, cache, *meta, 1.0)


def test_natural_log_lse():
    """One query, two keys with scores 0 and log 3: lse = log(1 + 3) in natural log."""
    q = torch.zeros(1, 1, 16)
    q[0, 0, 0] = 1.0
    k_cache = torch.zeros(1, 16, 1, 16)
    k_cache[0, 1, 0, 0] = math.log(3.0)
    v_cache = torch.randn(1, 16, 1, 16)
    i32 = torch.int32
    _, lse = paged_attention(
        *(t.to(DEVICE) for t in (q, k_cache, v_cache)),
        torch.tensor([0, 1], dtype=i32, device=DEVICE),
        torch.tensor([2], dtype=i32, device=DEVICE),
        torch.tensor([[0]], dtype=i32, device=DEVICE),
        1.0,
        return_lse=True,
    )
    assert abs(float(lse[0, 0]) - math.log(4.0)) < 1e-6
