"""Scale-out throughput vs worker count, on CPU workers, and how evenly the work spread.

    python bench/scale_out_bench.py                       # docs workload, 64 rows, 0 1 2 workers
    python bench/scale_out_bench.py --workers 0 2 4 --rows 256 --workload system
    python bench/scale_out_bench.py --model PATH          # a real checkpoint instead

A benchmark, not a test: it prints one table and asserts nothing. ``0`` workers is the job in
this process (torch on every core, or ``--threads``); ``N`` runs it on N Ray CPU workers (a
local Ray started once, with every core; each worker gets cores / N torch threads, or
``--threads``). Every run is the same job
through ``batchrun.core.api.run`` — read, plan, generate, journal, write — on the ~27M-parameter
llama of ``engine_bench.py`` (random weights, EOS ignored, float32).

Columns: ``engine s`` is the generation loop (for workers: from the first unit handed out to
the last row back, so worker start-up and model loads are not in it; ``start s`` is);
``out tok/s`` is output tokens over engine s; ``computed`` the prompt tokens the engines
computed (one process: the plan's; workers: each unit computes the prefix above it once);
``balance`` is mean / largest worker busy time (1.0 = even); ``rows`` and ``cost`` per
worker are what each did and the estimated tokens it was given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import make_model, make_workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--workload", default="docs", choices=("system", "docs", "fewshot", "unique", "mixed")
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (and in one process) [cores / N]"
    )
    args = parser.parse_args()

    import ray
    import torch

    from batchrun.core import api

    cores = os.cpu_count() or 1
    folder = Path(tempfile.mkdtemp(prefix="scale-out-bench-"))
    model = args.model or make_model(folder / "model")
    src = folder / "in.jsonl"
    items = make_workload(args.workload, args.rows, args.max_tokens)
    src.write_text(
        "".join(json.dumps({"id": i, "prompt": p, "max_tokens": m}) + "\n" for i, (p, m) in enumerate(items))
    )
    load = os.getloadavg()[0]
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    print(f"{args.workload}: {args.rows} rows, {cores} cores, load average {load:.1f} at the start")
    header = "workers | engine s | start s | out tok/s | speed-up | computed | balance | per worker"
    header += ": rows / cost / busy s"
    print(header)
    print("-" * len(header))
    base = None
    for workers in args.workers:
        started = time.perf_counter()
        if not workers and args.threads:
            torch.set_num_threads(args.threads)
        distributed = (
            api.DistributedConfig(workers=workers, cpus_per_worker=args.threads) if workers else None
        )
        config = api.JobConfig(
            input=src,
            model=model,
            output=folder / f"out-{workers}.jsonl",
            sampling={"ignore_eos": True},
            dtype="float32",
            restart=True,
            distributed=distributed,
        )
        summary = api.run_config(config)
        wall = time.perf_counter() - started
        stats = summary.engine
        rate = summary.generated_output_tokens / stats.seconds
        base = base or rate
        per_worker, balance, start_s = "-", "-", 0.0
        if getattr(stats, "workers", None):
            busy = [w.busy_s for w in stats.workers]
            balance = f"{sum(busy) / len(busy) / max(busy):.2f}"
            per_worker = ", ".join(f"{w.rows}/{w.assigned_cost}/{w.busy_s:.1f}" for w in stats.workers)
            start_s = summary.seconds["generate"] - stats.seconds
        print(
            f"{workers or 'one process':>7} | {stats.seconds:8.1f} | {start_s:7.1f} | {rate:9.1f} | "
            f"{rate / base:7.2f}x | {stats.prefill_tokens:8,} | {balance:>7} | {per_worker}"
            f"  (wall {wall:.0f}s)"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
