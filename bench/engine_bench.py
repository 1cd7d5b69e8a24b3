"""Engine throughput: transformers ``generate`` vs batchrun without and with its plan.

    python bench/engine_bench.py                    # ~27M-parameter llama, all workloads
    python bench/engine_bench.py --rows 32 --workloads system docs
    python bench/engine_bench.py --model PATH       # a real checkpoint instead

A benchmark, not a test: it prints one table and asserts nothing. Every (workload, system)
pair runs in a fresh process, so "peak RSS" is that system's own. Systems, on the same
model, machine and prompts:

* ``generate`` — transformers ``generate``, greedy, rows in file order, left-padded batches
  of ``--hf-batch`` (static batching: a batch runs until its longest row is done);
* ``batchrun plain`` — ``--no-prefix-sharing --order input``;
* ``batchrun`` — the full plan: shared prefixes computed once, decode-heavy work first.

Outputs ignore EOS, so every system generates exactly each row's ``max_tokens``; "out
tok/s" counts those useful tokens (generate's padding-to-the-longest-row is its own cost).
Workloads: see ``bench/workloads.py`` (shared with ``bench/peer_bench.py``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from workloads import WORKLOADS, make_model, make_workload

SYSTEMS = ("generate", "batchrun plain", "batchrun")


def run_generate(model_path: Path, prompts: list[list[int]], max_tokens: list[int], batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pad = model.config.pad_token_id or 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group, limits = prompts[i : i + batch], max_tokens[i : i + batch]
        width = max(map(len, group))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max(limits),
                min_new_tokens=max(limits),
                do_sample=False,
                pad_token_id=pad,
            )
    return {"seconds": time.perf_counter() - start, "saving": 0.0}


def run_batchrun(
    model_path: Path, prompts: list[list[int]], max_tokens: list[int], full: bool, budget: int
) -> dict:
    from batchrun.core.engine.config import EngineConfig
    from batchrun.core.engine.engine import build_engine
    from batchrun.core.job.requests import make_requests
    from batchrun.core.job.rows import Row
    from batchrun.core.params import SamplingParams
    from batchrun.core.planner.plan import build_plan
    from batchrun.core.planner.prompt_tokens import PromptTokens
    from batchrun.core.runner.model_loader import load_model

    loaded = load_model(model_path, device="cpu", dtype="float32")
    config = EngineConfig(token_budget=budget)
    start = time.perf_counter()  # planning is part of batchrun's cost
    tokens = PromptTokens.from_lists(prompts)
    limits = np.array(max_tokens)
    runnable = np.ones(len(prompts), dtype=bool)
    order = "plan" if full else "input"
    plan = build_plan(tokens, runnable, limits, config.block_size, sharing=full, order=order)
    rows = [
        Row(i, str(i), f"row {i}", params=SamplingParams(max_tokens=m, ignore_eos=True))
        for i, m in enumerate(max_tokens)
    ]
    useful = int(tokens.lengths.sum() + limits.sum())
    engine = build_engine(loaded, config, useful_tokens=useful)
    for _ in engine.generate(make_requests(rows, tokens, plan, job_seed=0, sample_sharing=full)):
        pass
    stats = engine.stats
    return {
        "seconds": time.perf_counter() - start,
        "saving": stats.saving,
        "steps": stats.steps,
        "tokens_per_step": stats.mean_tokens_per_step,
        "peak_kv_mib": stats.peak_blocks * engine.runner.kv_cache.spec.bytes_per_block / 2**20,
    }


def child(args: argparse.Namespace) -> None:
    """Run one system on one workload in this (fresh) process; print JSON."""
    torch.set_num_threads(args.threads)
    from batchrun.core.checkpoint import open_checkpoint

    tokenizer = open_checkpoint(args.model).tokenizer
    items = make_workload(args.workload, args.rows, args.max_tokens)
    prompts = [tokenizer(text)["input_ids"] for text, _ in items]
    limits = [m for _, m in items]
    if args.system == "generate":
        result = run_generate(args.model, prompts, limits, args.hf_batch)
    else:
        result = run_batchrun(args.model, prompts, limits, args.system == "batchrun", args.token_budget)
    result |= {
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": sum(limits),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: a ~27M llama made on the fly")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.system:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp) / "llama-27m")
        n_params = sum(p.numel() for p in _load(model).parameters())
        print(
            f"model {model.name} ({n_params / 1e6:.0f}M params, float32, CPU, {args.threads} threads); "
            f"{args.rows} rows per workload, max_tokens {args.max_tokens}; generate batch {args.hf_batch}"
        )
        header = f"{'workload':<9}{'system':<16}{'seconds':>8}{'out tok/s':>10}{'total tok/s':>12}"
        header += f"{'saving':>8}{'peak RSS MiB':>13}{'vs generate':>12}{'vs plain':>9}"
        print(header)
        for workload in args.workloads:
            results = {}
            for system in SYSTEMS:
                command = [sys.executable, __file__, "--model", str(model), "--workload", workload]
                command += [
                    "--system",
                    system,
                    "--rows",
                    str(args.rows),
                    "--max-tokens",
                    str(args.max_tokens),
                ]
                command += ["--hf-batch", str(args.hf_batch), "--token-budget", str(args.token_budget)]
                command += ["--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{workload}/{system} failed:\n{done.stderr}")
                r = results[system] = json.loads(done.stdout.strip().splitlines()[-1])
                total = r["prompt_tokens"] + r["output_tokens"]
                print(
                    f"{workload:<9}{system:<16}{r['seconds']:>8.2f}{r['output_tokens'] / r['seconds']:>10.1f}"
                    f"{total / r['seconds']:>12.1f}{r['saving']:>8.1%}{r['peak_rss_mib']:>13.0f}"
                    f"{results['generate']['seconds'] / r['seconds']:>11.2f}x"
                    + (
                        f"{results['batchrun plain']['seconds'] / r['seconds']:>8.2f}x"
                        if system == "batchrun"
                        else ""
                    ),
                    flush=True,
                )


def _load(model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model)


if __name__ == "__main__":
    main()
