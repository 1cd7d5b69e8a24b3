"""Nested shared prefixes found in a step's block tables (kernels/cascade_levels.py), and the
CPU backend reading each span once per level: on random nested steps (system ▸ document ▸
question, decodes and prefill chunks, members still inside a span) its output equals the torch
reference's in float32 and bf16."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.kernels.cascade_levels import cascade_levels
from batchrun.kernels.cpu_backend import CpuBackend
from batchrun.kernels.metadata import AttentionMetadata
from batchrun.kernels.torch_ref import TorchBackend


def nested_step(tree, block, q_lens, seed=0, hkv=2, gqa=4, d=32, dtype=torch.float32):
    """A step over a paged cache where sequences share blocks as ``tree`` says.

    ``tree`` is a list of sequences, each a list of (level key, blocks) segments followed by
    its own token count: sequences with equal keys at a level hold the same blocks there.
    Returns (meta, query, k_cache, v_cache)."""
    g = torch.Generator().manual_seed(seed)
    shared: dict[tuple, list[int]] = {}
    next_block, tables, lengths = 0, [], []
    for segments, own_tokens in tree:
        row, path = [], ()
        for key, blocks in segments:
            path += (key,)
            if path not in shared:
                shared[path] = list(range(next_block, next_block + blocks))
                next_block += blocks
            row += shared[path]
        own_blocks = -(-own_tokens // block)
        row += list(range(next_block, next_block + own_blocks))
        next_block += own_blocks
        tables.append(row)
        lengths.append(len(row) * block - (own_blocks * block - own_tokens))
    null = next_block
    width = max(map(len, tables))
    table = torch.tensor([r + [null] * (width - len(r)) for r in tables], dtype=torch.int32)
    k = torch.randn(null + 1, block, hkv, d, generator=g).to(dtype)
    v = torch.randn(null + 1, block, hkv, d, generator=g).to(dtype)
    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(lengths, dtype=torch.int32),
        block_tables=table,
        null_block=null,
        block_size=block,
        q_lens_host=tuple(q_lens),
        seq_lens_host=tuple(lengths),
        q_starts_host=tuple(cu),
        group_keys_host=(-1,) * len(q_lens),
        group_prefix_lens_host=(0,) * len(q_lens),
    )
    query = torch.randn(cu[-1], hkv * gqa, d, generator=g).to(dtype)
    return meta, query, k, v


def test_levels_follow_the_shared_blocks():
    """system (3 blocks) ▸ two documents (2 blocks each, 2 and 3 members) ▸ own decodes; a
    sequence outside the system group; a member whose prefill chunk reaches into the
    document takes part in the system span only."""
    block = 4
    tree = [
        ([("sys", 3), ("doc a", 2)], 5),
        ([("sys", 3), ("doc a", 2)], 6),
        ([("sys", 3), ("doc b", 2)], 3),
        ([("sys", 3), ("doc b", 2)], 7),
        ([("sys", 3), ("doc b", 2)], 2),
        ([("other", 4)], 1),
        ([("sys", 3), ("doc b", 2)], 1),  # 8 queries from position 13: inside doc b
    ]
    q_lens = [1, 1, 1, 2, 1, 1, 8]
    meta, *_ = nested_step(tree, block, q_lens)
    shared = cascade_levels(meta, min_saved_tokens=1)
    assert shared is not None and len(shared.levels) == 2
    outer, inner = shared.levels
    assert outer.key_begin.tolist() == [0] and outer.key_end.tolist() == [12]
    assert outer.rows.tolist() == [0, 1, 2, 3, 4, 5, *range(7, 15)]  # not sequence 5's row 6
    rows_per_span = inner.cu_rows.diff().tolist()
    spans = sorted(zip(inner.key_begin.tolist(), inner.key_end.tolist(), rows_per_span, strict=True))
    assert spans == [(12, 20, 2), (12, 20, 4)]  # doc a: rows of sequences 0, 1; doc b: 2, 3 (2 rows), 4
    assert shared.kv_start.tolist() == [20, 20, 20, 20, 20, 0, 12]


def test_spans_sparing_too_little_are_not_split():
    tree = [([("sys", 1)], 3), ([("sys", 1)], 2)]
    meta, *_ = nested_step(tree, 4, [1, 1])
    assert cascade_levels(meta, min_saved_tokens=4) is not None  # (2 - 1) x 4 tokens
    assert cascade_levels(meta, min_saved_tokens=5) is None


@settings(max_examples=30, deadline=None)
@given(
    block=st.sampled_from([1, 4, 16]),
    gqa=st.sampled_from([1, 2, 4, 8]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    docs=st.lists(st.integers(1, 4), min_size=1, max_size=4),  # members per document
    system_blocks=st.integers(1, 12),
    doc_blocks=st.integers(1, 12),
    chunk=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_cpu_backend_with_nested_spans_equals_the_reference(
    block, gqa, dtype, docs, system_blocks, doc_blocks, chunk, seed
):
    """Every member decodes or runs a prefill chunk after its document; the CPU backend reads
    the system prompt and each document once per level and merges the parts exactly."""
    tree, q_lens = [], []
    for d, members in enumerate(docs):
        for m in range(members):
            own = 1 + (seed + 7 * d + 3 * m) % 50
            tree.append(([("sys", system_blocks), (f"doc {d}", doc_blocks)], own))
            q_lens.append(min(own, chunk if (d + m) % 2 else 1))
    tree.append(([("alone", 2)], 5))  # shares nothing
    q_lens.append(3)
    meta, query, k, v = nested_step(tree, block, q_lens, seed=seed, gqa=gqa, dtype=dtype)
    scale = 0.3
    cpu, ref = CpuBackend(), TorchBackend()
    state = cpu.build(meta)
    if sum(docs) > 1:
        assert state.levels, "shared spans were not found"
    got = cpu.forward(state, query, k, v, scale)
    expected = ref.forward(ref.build(meta), query.float(), k.float(), v.float(), scale)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_three_levels(dtype):
    """system ▸ document ▸ shared question prefix (as n samples of one prompt share it); each
    level has a member that leaves the span below it, so each is a level of its own."""
    tree = [([("s", 2), ("d", 3), ("q", 1)], 2 + i) for i in range(3)]
    tree += [([("s", 2), ("d", 3)], 4), ([("s", 2)], 6)]
    meta, query, k, v = nested_step(tree, 8, [1, 1, 2, 1, 3], dtype=dtype)
    cpu, ref = CpuBackend(), TorchBackend()
    state = cpu.build(meta)
    assert len(state.levels) == 3
    got = cpu.forward(state, query, k, v, 0.2)
    expected = ref.forward(ref.build(meta), query.float(), k.float(), v.float(), 0.2)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)
