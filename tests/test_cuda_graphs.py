"""CUDA graphs for small steps (core/runner/cuda_graphs.py), checked without a GPU.

* ``pad_step`` pads a step to its bucket and leaves every real row as it was;
* the Triton backend on a padded (static-shape) step gives the unpadded step's outputs on
  the real rows, cascade and plain paths alike, and two steps of one bucket share a key;
* end to end, the oracle holds with graphs on: greedy tokens equal transformers ``generate``
  with small steps padded and "replayed". Without a GPU a replay reruns the forward bound to
  the captured step's tensors, refreshed in place (``rerun_capture``): an input the replay
  failed to refresh would give another step's results. Every captured forward also runs
  under a probe that fails on any op that makes a GPU wait for the host (``.item()``,
  ``nonzero``, boolean indexing): such an op cannot be captured.

The real capture and replay run in the ``gpu`` test at the end (skipped without CUDA).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from batchrun.core.engine.engine import _use_cuda_graphs  # noqa: E402
from batchrun.core.runner.cuda_graphs import (  # noqa: E402
    GRAPH_TOKEN_BUCKETS,
    graph_memory_bytes,
    pad_step,
    rerun_capture,
    table_width,
    token_bucket,
)
from batchrun.core.runner.host_sync_probe import HostSyncProbe  # noqa: E402
from batchrun.core.runner.input_batch import StepInputs  # noqa: E402
from batchrun.core.runner.model_loader import load_model  # noqa: E402
from batchrun.core.runner.model_runner import attention_metadata  # noqa: E402
from batchrun.kernels import get_backend  # noqa: E402
from batchrun.kernels.triton.split_kv import split_hint, splits_for  # noqa: E402
from batchrun.kernels.triton_backend import TritonBackend  # noqa: E402

from helpers import reference_generate, run_engine  # noqa: E402

NULL = 0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs interpreted on the CPU


def make_step(seqs, block_size, prefix_blocks=(1, 2)) -> StepInputs:
    """A step from ``(group key, prefix tokens, q_len, seq_len)`` per sequence: grouped
    sequences share ``prefix_blocks``, every other block is a sequence's own."""
    next_block = max(prefix_blocks) + 1
    tables, positions, slots, cu = [], [], [], [0]
    for key, prefix_len, q_len, seq_len in seqs:
        blocks = list(prefix_blocks[: prefix_len // block_size]) if key >= 0 else []
        while len(blocks) * block_size < seq_len:
            blocks.append(next_block)
            next_block += 1
        tables.append(blocks)
        pos = np.arange(seq_len - q_len, seq_len)
        positions.append(pos)
        slots.append(np.array(blocks)[pos // block_size] * block_size + pos % block_size)
        cu.append(cu[-1] + q_len)
    width = max(map(len, tables))
    table = np.full((len(seqs), width), NULL, dtype=np.int32)
    for i, blocks in enumerate(tables):
        table[i, : len(blocks)] = blocks
    total = cu[-1]
    return StepInputs(
        req_ids=tuple(range(len(seqs))),
        input_ids=np.arange(total, dtype=np.int64) + 5,
        positions=np.concatenate(positions).astype(np.int64),
        slot_mapping=np.concatenate(slots).astype(np.int64),
        cu_seqlens_q=np.array(cu, dtype=np.int32),
        seq_lens=np.array([s[3] for s in seqs], dtype=np.int32),
        block_tables=table,
        group_keys=np.array([s[0] for s in seqs], dtype=np.int64),
        group_prefix_lens=np.array([s[1] for s in seqs], dtype=np.int64),
        sample_rows=np.array(cu[1:], dtype=np.int64) - 1,
        sample_req_ids=tuple(range(len(seqs))),
    )


# Three members of group 7 (16-token prefix) — two decodes and a 4-token chunk — an
# ungrouped decode and a whole 3-token prompt: 10 tokens, 5 sequences.
MIXED = [(7, 16, 1, 21), (7, 16, 1, 30), (7, 16, 4, 25), (-1, 0, 1, 9), (-1, 0, 3, 3)]


def test_graph_memory_counts_the_float32_logits_buffer(loaded):
    config = loaded.model.config
    kept = graph_memory_bytes(config, torch.bfloat16)
    assert kept > 512 * config.vocab_size * 4
    assert graph_memory_bytes(config, torch.bfloat16, tokens=64) < kept


def test_buckets_and_widths():
    assert [token_bucket(n) for n in (1, 3, 16, 17, 500, 512)] == [1, 4, 16, 24, 512, 512]
    assert token_bucket(513) is None
    assert list(GRAPH_TOKEN_BUCKETS) == sorted(set(GRAPH_TOKEN_BUCKETS))
    assert [table_width(w) for w in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]


def test_split_hint_keeps_every_split_choice():
    """Graphs are keyed on ``split_hint(longest keys)``, not the keys: every launch must split
    the same way for both, whatever its program count and the GPU's size."""
    for keys in range(0, 9000, 7):
        for programs in (1, 3, 8, 50, 200, 1000):
            for target in (64, 264, 528):
                assert splits_for(programs, split_hint(keys), target) == splits_for(programs, keys, target)
    assert split_hint(300) == 0 and split_hint(512) == 512 and split_hint(1000) == 512
    assert split_hint(10**6) == 16 * 256


def test_pad_step_keeps_the_real_rows_and_pads_with_null_block_sequences():
    step = make_step(MIXED, block_size=8)
    padded = pad_step(step, tokens=16, width=8, null_block=NULL, block_size=8)
    T, S = 10, 5
    # real rows and sequences unchanged, first
    for name in ("input_ids", "positions", "slot_mapping", "group_keys", "group_prefix_lens"):
        np.testing.assert_array_equal(getattr(padded, name)[: len(getattr(step, name))], getattr(step, name))
    np.testing.assert_array_equal(padded.cu_seqlens_q[: S + 1], step.cu_seqlens_q)
    np.testing.assert_array_equal(padded.seq_lens[:S], step.seq_lens)
    np.testing.assert_array_equal(padded.block_tables[:S, : step.block_tables.shape[1]], step.block_tables)
    # shapes set by the bucket alone: 16 tokens, 16 sequences, 16 sampled rows, width 8
    assert padded.input_ids.shape == padded.positions.shape == padded.slot_mapping.shape == (16,)
    assert padded.cu_seqlens_q.shape == (17,) and padded.seq_lens.shape == (16,)
    assert padded.block_tables.shape == (16, 8) and padded.sample_rows.shape == (16,)
    # 6 padding sequences of one token at position 0 in the null block, then 5 empty ones
    q_lens = np.diff(padded.cu_seqlens_q)
    assert q_lens[S:].tolist() == [1] * 6 + [0] * 5
    assert padded.seq_lens[S:].tolist() == [1] * 6 + [0] * 5
    assert padded.positions[T:].tolist() == [0] * 6
    assert padded.slot_mapping[T:].tolist() == [NULL * 8] * 6
    assert (padded.block_tables[S:] == NULL).all() and (padded.block_tables[:S, 4:] == NULL).all()
    assert (padded.group_keys[S:] == -1).all()
    assert padded.sample_rows[: len(step.sample_rows)].tolist() == step.sample_rows.tolist()
    assert padded.sample_req_ids == step.sample_req_ids
    with pytest.raises(ValueError, match="cannot pad"):
        pad_step(step, tokens=8, width=8, null_block=NULL, block_size=8)


def on_device(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).to(DEVICE)


def attend(backend, step: StepInputs, query, k_cache, v_cache, block_size, static, **options):
    meta = attention_metadata(step, NULL, block_size, on_device, static_shapes=static)
    state = backend.build(meta)
    return backend.forward(state, query, k_cache, v_cache, 0.25, **options), state


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_triton_on_a_padded_step_equals_the_unpadded_step(sliding_window):
    """Cascade (group 7's prefix split off and merged) and, with a window, the plain paged
    kernel: the real rows of the padded step get the same outputs."""
    block_size, hkv, hq, d = 8, 2, 4, 32
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(16, block_size, hkv, d, generator=gen).to(DEVICE)
    v_cache = torch.randn(16, block_size, hkv, d, generator=gen).to(DEVICE)
    step = make_step(MIXED, block_size)
    padded = pad_step(step, tokens=16, width=8, null_block=NULL, block_size=block_size)
    query = torch.randn(16, hq, d, generator=gen).to(DEVICE)
    backend = TritonBackend()
    cache = (k_cache, v_cache, block_size)
    want, state = attend(backend, step, query[:10], *cache, False, sliding_window=sliding_window)
    got, static = attend(backend, padded, query, *cache, True, sliding_window=sliding_window)
    assert state.cascade is not None and static.cascade is not None  # the prefix kernel ran
    torch.testing.assert_close(got[:10], want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()  # padding rows read the null block: garbage, never NaN here


def test_steps_of_one_bucket_share_a_graph_key():
    """Two decode steps of different lengths and groups that pad to one bucket launch alike."""
    backend = TritonBackend()
    keys = []
    for seqs in ([(7, 16, 1, 21), (7, 16, 1, 30), (-1, 0, 1, 9)], [(7, 16, 1, 40), (7, 16, 1, 18)]):
        padded = pad_step(make_step(seqs, 8), tokens=4, width=8, null_block=NULL, block_size=8)
        meta = attention_metadata(padded, NULL, 8, on_device, static_shapes=True)
        inputs = backend.graph_inputs(backend.build(meta))
        keys.append((inputs.key, [(t.shape, t.dtype) for t in inputs.tensors]))
    assert keys[0] == keys[1]


# -- end to end --------------------------------------------------------------------------

SYSTEM = "You are a careful analyst. Answer from the document only."
TEXTS = [
    f"{SYSTEM}\nThe lighthouse was built in 1871.\nQ: When?",
    f"{SYSTEM}\nThe lighthouse was built in 1871.\nQ: Of what?",
    f"{SYSTEM}\nThe lighthouse was built in 1871.\nQ: By whom?",
    f"{SYSTEM}\nThe bakery sells rye.\nQ: What?",
    "Hi",
]
MAX_TOKENS = [9, 7, 8, 6, 5]


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(tiny_llama, device=DEVICE, dtype="float32")


@pytest.mark.parametrize("block_size, token_budget", [(8, 4096), (8, 12)])
def test_oracle_holds_with_small_steps_in_graphs(loaded, tiny_llama, block_size, token_budget):
    """Decode steps shrink 5 -> 1 sequences (the cascade on while group members remain);
    with a 12-token budget prefill chunks share steps with decodes. Each key is captured on
    its second sighting and replayed after that."""
    probes: list[HostSyncProbe] = []

    def probed_capture(forward, pool):
        with HostSyncProbe() as probe:
            forward()  # what a real capture records (its K/V writes are rewritten the same)
        probes.append(probe)
        return rerun_capture(forward, pool)

    graphs = []

    def turn_on(engine):
        graphs.append(engine.runner.use_graphs(probed_capture))

    prompts = [loaded.tokenizer(t)["input_ids"] for t in TEXTS]
    expected = reference_generate(tiny_llama, prompts, MAX_TOKENS)
    got, engine = run_engine(
        loaded,
        prompts,
        MAX_TOKENS,
        block_size=block_size,
        token_budget=token_budget,
        attention_backend="triton",
        on_build=turn_on,
    )
    assert got == expected
    (steps,) = graphs
    assert steps.replays > 0 and len(steps.graphs) >= 2 and not steps.disabled
    assert any(key[1][-1] is not None for key in steps.graphs), "no graph ran the cascade"
    assert engine.stats.graph_steps == steps.replays and engine.stats.cuda_graphs == len(steps.graphs)
    assert probes and all(not p.seen for p in probes), [p.seen for p in probes]


x = torch.arange(4)
REPEATS = torch.tensor([1, 2, 1, 0])
SYNCS = {  # what the host must read (sizes, values) or copy mid-pass
    "item": lambda: x.sum().item(),
    "nonzero": lambda: x.nonzero(),
    "boolean index": lambda: x[x > 1],
    "boolean index put": lambda: x.clone().__setitem__(x > 1, 0),
    "repeats as a tensor": lambda: x.repeat_interleave(REPEATS),
    "unique": lambda: torch.unique(x),
    "bincount": lambda: x.bincount(),
    "copy to another device": lambda: x.to("meta"),  # the only other device a CPU has
}
QUIET = {
    "arithmetic": lambda: x * 2 + 1,
    "integer index": lambda: x[REPEATS],
    "repeats with their total": lambda: x.repeat_interleave(REPEATS, output_size=4),
    "repeats as an int": lambda: x.repeat_interleave(2),
    "copy on one device": lambda: torch.empty(4).copy_(x),
}


@pytest.mark.parametrize("name", list(SYNCS) + list(QUIET))
def test_the_host_sync_probe_sees_syncs_and_only_those(name):
    """Under inference mode, as the runner runs (``.item()`` is another aten op there)."""
    with torch.inference_mode(), HostSyncProbe() as probe:
        (SYNCS | QUIET)[name]()
    assert bool(probe.seen) == (name in SYNCS), probe.seen


def test_a_forward_that_syncs_turns_graphs_off_before_any_capture(loaded, tiny_llama, caplog):
    """A forward with an ``.item()`` in it cannot be captured: the first padded (eager) run
    finds it, graphs go off with a warning naming the op, and the tokens are still right."""
    captures = []

    def turn_on(engine):
        graphs = engine.runner.use_graphs(lambda forward, pool: captures.append(1) or forward)
        plain = graphs.forward
        graphs.forward = lambda step: (step.positions.sum().item(), plain(step))[1]
        turned_on.append(graphs)

    turned_on = []
    prompts = [loaded.tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    expected = reference_generate(tiny_llama, prompts, MAX_TOKENS[:2])
    options = dict(block_size=8, token_budget=4096, attention_backend="triton")
    got, _ = run_engine(loaded, prompts, MAX_TOKENS[:2], on_build=turn_on, **options)
    assert got == expected
    assert "aten.item" in turned_on[0].disabled and not captures and not turned_on[0].replays
    assert "CUDA graphs off" in caplog.text and "syncs with the host" in caplog.text


def test_a_failed_capture_turns_graphs_off_and_the_run_goes_on(loaded, tiny_llama, caplog):
    def failing_capture(forward, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    prompts = [loaded.tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    expected = reference_generate(tiny_llama, prompts, MAX_TOKENS[:3])
    graphs = []
    got, _ = run_engine(
        loaded,
        prompts,
        MAX_TOKENS[:3],
        block_size=8,
        token_budget=4096,
        attention_backend="triton",
        on_build=lambda engine: graphs.append(engine.runner.use_graphs(failing_capture)),
    )
    assert got == expected
    assert graphs[0].disabled and "not permitted" in graphs[0].disabled and not graphs[0].graphs
    assert "CUDA graphs off" in caplog.text


def test_which_runs_get_graphs(loaded):
    """On CUDA, backends that declare ``cuda_graphs`` (Triton) get them unless turned off; the
    choice is said in the backend line. On the CPU, never (and nothing is said)."""
    from batchrun.core.engine.config import EngineConfig
    from batchrun.core.engine.engine import build_engine

    engine = build_engine(loaded, EngineConfig(attention_backend="triton"))
    choice = engine.info.attention_backend_choice
    if DEVICE == "cuda":
        assert engine.runner.graphs is not None and "CUDA graphs for steps of up to 512 tokens" in choice
        assert "MiB kept out of the KV cache for them" in choice
        off = build_engine(loaded, EngineConfig(attention_backend="triton", cuda_graphs=False))
        assert off.runner.graphs is None
        assert "no CUDA graphs (--no-cuda-graphs)" in off.info.attention_backend_choice
    else:
        assert engine.runner.graphs is None and "CUDA graphs" not in choice
    assert _use_cuda_graphs(engine.runner, wanted=False) == "no CUDA graphs (--no-cuda-graphs)"
    assert _use_cuda_graphs(engine.runner, wanted=True) == "CUDA graphs for steps of up to 512 tokens"
    assert engine.runner.graphs is not None
    torch_engine = build_engine(loaded, EngineConfig(attention_backend="torch"))
    assert "torch backend does not run in them" in _use_cuda_graphs(torch_engine.runner, wanted=True)
    assert torch_engine.runner.graphs is None
    with pytest.raises(ValueError, match="does not run in CUDA graphs"):
        torch_engine.runner.use_graphs()
    assert not get_backend("torch").capabilities.cuda_graphs


@pytest.mark.gpu
def test_real_cuda_graphs_equal_transformers_generate(tiny_llama):
    """On a GPU: float32, the Triton backend, graphs captured and replayed for real."""
    loaded = load_model(tiny_llama, device="cuda", dtype="float32")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the oracle's CPU run)
    prompts = [loaded.tokenizer(t)["input_ids"] for t in TEXTS]
    expected = reference_generate(tiny_llama, prompts, MAX_TOKENS)
    options = dict(block_size=8, token_budget=4096, attention_backend="triton")
    got, engine = run_engine(loaded, prompts, MAX_TOKENS, **options)
    assert engine.runner.graphs is not None and not engine.runner.graphs.disabled
    assert engine.stats.graph_steps > 0
    assert got == expected
