"""Helpers shared by the tests: paths, tiny random-weight checkpoints, the oracle, the
engine driver and the CLI runner. Tests import from here, never from each other.

No test downloads anything: models are built from ``transformers`` configs with a fixed
seed and saved into temporary folders beside a copy of the bundled tokenizer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from batchrun.cli import main
from batchrun.cli.main import cli
from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.engine import build_engine
from batchrun.core.job.requests import make_requests
from batchrun.core.job.rows import Row
from batchrun.core.params import SamplingParams
from batchrun.core.planner.plan import build_plan
from batchrun.core.planner.prompt_tokens import PromptTokens

REPO = Path(__file__).resolve().parents[1]
SAMPLE_JOBS = REPO / "sample_jobs"
TINY_LLAMA = SAMPLE_JOBS / "models" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# A tiny decoder config shared by the architecture and job tests (2 layers, GQA 4/2).
COMMON = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=2,
    pad_token_id=0,
    bos_token_id=None,
    initializer_range=0.1,
)


def save_tiny_model(config, folder: Path, seed: int = 0) -> Path:
    """Save a random-weight model for ``config`` with the bundled tokenizer into ``folder``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_LLAMA / name, folder / name)
    return folder


def reference_generate(
    model_path: Path, prompts: list[list[int]], max_tokens: list[int], **generate_kwargs
) -> list[list[int]]:
    """The oracle: transformers ``generate``, greedy, float32, one row at a time (no padding);
    ``generate_kwargs`` adds logits processors (e.g. ``repetition_penalty``)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    outputs = []
    for ids, n in zip(prompts, max_tokens, strict=True):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=model.config.pad_token_id,
                **generate_kwargs,
            )
        outputs.append(out[0, len(ids) :].tolist())
    return outputs


def run_engine(
    loaded,
    prompts,
    max_tokens,
    *,
    sharing=True,
    order="plan",
    n=1,
    seed=None,
    wrap_runner=None,
    backend=None,
    on_build=None,
    **engine_kwargs,
):
    """Plan the prompts, run the plan's requests, check nothing leaked; tokens per row
    (per sample with ``n > 1``). ``backend``: an attention backend built by the test;
    ``on_build(engine)`` runs before the first step (e.g. to turn the runner's graphs on)."""
    config = EngineConfig(**engine_kwargs)
    tokens = PromptTokens.from_lists(prompts)
    plan = build_plan(
        tokens,
        np.ones(len(prompts), bool),
        np.array(max_tokens),
        config.block_size,
        sharing=sharing,
        order=order,
    )
    rows = [
        Row(
            i,
            str(i),
            f"row {i}",
            params=SamplingParams(max_tokens=m, n=n, seed=seed, temperature=1.0 if seed else 0),
        )
        for i, m in enumerate(max_tokens)
    ]
    engine = build_engine(loaded, config, backend=backend)
    if wrap_runner is not None:  # e.g. to pass every message through pickle
        engine.runner.execute = wrap_runner(engine.runner.execute)
    if on_build is not None:
        on_build(engine)
    done = {}
    for c in engine.generate(make_requests(rows, tokens, plan, job_seed=0, sample_sharing=sharing)):
        done[c.row, c.sample_index] = c
    assert engine.kv.num_free == engine.kv.pool.num_blocks, "KV blocks leaked"
    assert not engine.kv.prefixes.segments and not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.scheduler.requests
    if engine.stats.preemptions == 0 and n == 1:  # the engine computes exactly what the plan said
        assert engine.stats.prefill_tokens == plan.summary.computed_tokens
    got = [[done[i, k].token_ids for k in range(n)] for i in range(len(prompts))]
    return (got if n > 1 else [g[0] for g in got]), engine


def batchrun(*args, cwd=None):
    command = [sys.executable, "-m", "batchrun.cli.main", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def run_cli(capsys, *args):
    """The CLI in this process: (exit code, stdout, stderr); tables are not wrapped."""
    width = main.out.width
    main.out.width = 400
    try:
        code = cli([str(a) for a in args])
    finally:
        main.out.width = width
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def spawn_batchrun(*args):
    """Start ``batchrun`` in a child process (to kill it midway); its output is piped."""
    command = [sys.executable, "-m", "batchrun.cli.main", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, timeout=120.0):
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
