"""The in-place CPU attention kernel (kernels/cpu/) against the torch reference, on random
shapes: block sizes that do and do not divide the lengths, GQA ratios 1-8, prefill chunks
and decodes, soft-capping, sliding windows, three dtypes, bf16 with and without AMX tiles
(where the CPU has them); and a group's prefix part merged
with each member's own part equals attention over the whole context. Then the oracle
through the CPU backend for every GQA ratio, with groups split at their prefix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from batchrun.core.runner.model_loader import load_model
from batchrun.kernels import cpu_backend
from batchrun.kernels.cpu import KeyItems, Partial, paged_attention
from batchrun.kernels.torch_ref import attend

from helpers import COMMON, reference_generate, run_engine, save_tiny_model

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def paged(seq_lens, block_size, num_kv_heads, head_dim, dtype, generator):
    """A shuffled paged cache holding ``seq_lens`` tokens per sequence; (k, v, tables)."""
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 3  # spare blocks no table points at
    shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=generator).to(dtype)
    v = torch.randn(shape, generator=generator).to(dtype)
    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.full((len(seq_lens), max(blocks)), num_blocks, dtype=torch.int32)  # null block
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = order[used : used + n]
        used += n
    return k, v, tables


def dense(cache, table, length):
    return cache[table.long()].flatten(0, 1)[:length]  # (L, Hkv, D)


def int32(values):
    return torch.tensor(values, dtype=torch.int32)


shapes = st.fixed_dictionaries(
    {
        "block_size": st.sampled_from([1, 7, 16, 64]),
        "num_kv_heads": st.sampled_from([1, 2]),
        "gqa": st.sampled_from([1, 2, 4, 8]),
        "head_dim": st.sampled_from([16, 32, 64, 80, 128]),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        "seqs": st.lists(  # (context length, query length); AMX chunks are 128 keys
            st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
            min_size=1,
            max_size=6,
        ),
        "softcap": st.sampled_from([None, 20.0]),
        "window": st.sampled_from([None, 1, 9]),
        "amx": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_kernel_equals_the_torch_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    seq_lens = [n for n, _ in case["seqs"]]
    q_lens = [q for _, q in case["seqs"]]
    hkv, dtype = case["num_kv_heads"], case["dtype"]
    hq, d = hkv * case["gqa"], case["head_dim"]
    k, v, tables = paged(seq_lens, case["block_size"], hkv, d, dtype, g)
    query = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    cu = int32([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    items = KeyItems(cu, tables, int32([0] * len(seq_lens)), int32(seq_lens), causal=True)
    scale = d**-0.5
    softcap, window = case["softcap"], case["window"]
    out = paged_attention(
        query, k, v, items, scale, torch.empty_like(query), softcap=softcap, sliding_window=window,
        use_amx=case["amx"],
    )  # fmt: skip
    for i, n in enumerate(seq_lens):
        rows = slice(cu[i], cu[i + 1])
        expected = attend(
            query[rows].float(),
            dense(k, tables[i], n).float(),
            dense(v, tables[i], n).float(),
            scale,
            softcap,
            window,
        )
        torch.testing.assert_close(out[rows].float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    block_size=st.sampled_from([1, 4, 16]),
    gqa=st.sampled_from([1, 2, 4, 8]),
    prefix_blocks=st.integers(1, 6),
    members=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=5),
    softcap=st.sampled_from([None, 20.0]),
    seed=st.integers(0, 2**16),
)
def test_prefix_part_merged_with_own_parts_equals_whole_attention(
    dtype, block_size, gqa, prefix_blocks, members, softcap, seed
):
    """One group: every member's rows (decodes or chunks after the prefix) read the shared
    prefix blocks once in a non-causal item; their own parts start from that partial. In
    bf16 the prefix item's many rows take the AMX tiles where the CPU has them."""
    g = torch.Generator().manual_seed(seed)
    hkv, d, tol = 2, 32, (2e-5 if dtype == torch.float32 else TOLERANCE[dtype])
    if dtype == torch.bfloat16:  # a prefix over one AMX chunk (128 keys)
        prefix_blocks += -(-140 // block_size)
    prefix_len = prefix_blocks * block_size
    own = [(prefix_len + extra, min(q, extra)) for extra, q in members]  # queries after the prefix
    seq_lens, q_lens = [n for n, _ in own], [q for _, q in own]
    k, v, tables = paged(seq_lens, block_size, hkv, d, dtype, g)
    tables[:, :prefix_blocks] = tables[0, :prefix_blocks].clone()  # the members share the prefix blocks
    query = torch.randn(sum(q_lens), hkv * gqa, d, generator=g).to(dtype)
    cu = int32([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    scale = d**-0.5
    prefix = Partial(torch.empty(query.shape), torch.full(query.shape[:2], float("-inf")))
    group = KeyItems(
        int32([0, len(query)]), tables[:1, :prefix_blocks].contiguous(), int32([0]), int32([prefix_len]),
        causal=False, rows=torch.arange(len(query), dtype=torch.int32),
    )  # fmt: skip
    paged_attention(query, k, v, group, scale, prefix.out, out_lse=prefix.lse, softcap=softcap)
    items = KeyItems(cu, tables, int32([prefix_len] * len(own)), int32(seq_lens), causal=True)
    out = paged_attention(query, k, v, items, scale, torch.empty_like(query), prior=prefix, softcap=softcap)
    whole = KeyItems(cu, tables, int32([0] * len(own)), int32(seq_lens), causal=True)
    expected = paged_attention(query, k, v, whole, scale, torch.empty_like(query), softcap=softcap)
    torch.testing.assert_close(out, expected, atol=tol / 10, rtol=tol)
    for i, n in enumerate(seq_lens):  # and the whole-context call against the reference
        rows = slice(cu[i], cu[i + 1])
        keys, values = dense(k, tables[i], n).float(), dense(v, tables[i], n).float()
        ref = attend(query[rows].float(), keys, values, scale, softcap)
        torch.testing.assert_close(expected[rows].float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("num_kv_heads, block_size", [(8, 1), (4, 7), (2, 16), (1, 64)])
def test_oracle_through_the_cpu_backend_for_every_gqa_ratio(num_kv_heads, block_size, tmp_path, monkeypatch):
    """Greedy tokens equal transformers ``generate``; nested groups (system > document)
    share their prefixes through the kernel's span items, one level each (counted)."""
    config = LlamaConfig(**{**COMMON, "num_attention_heads": 8, "num_key_value_heads": num_kv_heads})
    path = save_tiny_model(config, tmp_path / "model")
    loaded = load_model(path, device="cpu", dtype="float32")
    levels_per_step = []
    real = cpu_backend.CpuBackend.build

    def counting(self, meta):
        state = real(self, meta)
        levels_per_step.append(len(state.levels))
        return state

    monkeypatch.setattr(cpu_backend.CpuBackend, "build", counting)
    system = (
        "You are a careful analyst. Answer from the document only, briefly and plainly. "
        "Quote the sentence you rely on, say when the document does not answer the question, "
        "and never guess a date, a name or a number that the document does not give."
    )  # more than 64 tokens, so even 64-token blocks share a prefix
    docs = ["The lighthouse was built in 1871 from granite.", "The bakery sells rye bread."]
    texts = [f"{system}\n{doc}\nQ: {q}" for doc in docs for q in ("When?", "What is it?", "Who?")] + ["Hi"]
    prompts = [loaded.tokenizer(t)["input_ids"] for t in texts]
    max_tokens = [5, 7, 4, 6, 3, 8, 5]
    expected = reference_generate(path, prompts, max_tokens)
    got, engine = run_engine(loaded, prompts, max_tokens, block_size=block_size, token_budget=40)
    assert engine.runner.backend.name == "cpu"
    assert got == expected
    # the documents are shorter than a 64-token block: then only the system prompt is a span
    levels = 2 if block_size <= 16 else 1
    assert max(levels_per_step) >= levels, "the step's shared prefixes were not each read once"
