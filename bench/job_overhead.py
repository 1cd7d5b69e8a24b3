"""batchrun's own per-row cost in ``run``: the whole job with the model's forward pass stubbed.

A benchmark, not a test. Runs ``run_job`` on a JSONL file (``bench/scale_bench.py`` writes
them) with ``--max-tokens 1``, in this process, with ``ModelRunner.execute`` replaced by a
stub that keeps the runner's bookkeeping (the step's inputs are still built from the
scheduler's message) but samples token 0 for every sampling chunk instead of running the
model. What remains is everything batchrun does per row outside the model: reading,
planning, requests, scheduling, KV blocks, journaling and the streamed write. Its rows/s
bound what ``run --max-tokens 1`` can reach however fast the model is; cProfile shows where
the time goes (``--profile out.prof``).

    python bench/job_overhead.py /tmp/rows10000.jsonl
"""

from __future__ import annotations

import argparse
import cProfile
import tempfile
import time
from pathlib import Path

from batchrun.core.job.config import JobConfig
from batchrun.core.job.run import run_job
from batchrun.core.runner.model_runner import ModelRunner
from batchrun.core.sched.messages import StepPlan, StepResult

REPO = Path(__file__).resolve().parents[1]


def stub_execute(self: ModelRunner, plan: StepPlan) -> StepResult:
    """The runner's bookkeeping without the forward pass: token 0 for each sampling chunk."""
    self.batch.apply(plan)
    inputs = self.batch.step_inputs(plan)
    req_ids = tuple(inputs.sample_req_ids)
    result = StepResult(req_ids, (0,) * len(req_ids))
    self.batch.record(plan, result.req_ids, result.token_ids)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", type=Path)
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats here")
    args = parser.parse_args()
    ModelRunner.execute = stub_execute  # a benchmark process of its own: nothing else runs the model
    out = Path(tempfile.mkdtemp(prefix="batchrun-overhead-")) / "out.jsonl"
    config = JobConfig(
        input=args.input,
        model=REPO / "sample_jobs" / "models" / "tiny-llama",
        output=out,
        sampling={"max_tokens": 1},
    )
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    summary = run_job(config)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    seconds = time.perf_counter() - start
    phases = " ".join(f"{k} {v:.1f}s" for k, v in summary.seconds.items())
    print(f"{summary.rows} rows in {seconds:.1f}s: {summary.rows / seconds:,.0f} rows/s end to end; {phases}")
    generate = summary.seconds.get("generate", 0.0)
    if generate:
        print(f"generate: {summary.rows / generate:,.0f} rows/s without the model's forward pass")


if __name__ == "__main__":
    main()
