"""Scale-out over Ray with a local cluster (2 CPUs, 2 CPU workers, the bundled tiny model):
the output equals one process's, the engines compute the prompt tokens the split predicted
(close to the single-process plan's), a worker killed midway loses nothing and duplicates
nothing, a driver SIGKILLed midway resumes, and workers that cannot start fail the job (exit 4
in the CLI) with the journal kept, while one that cannot start is reported and the job goes on
with the others. One Ray session is shared by the module (it costs seconds)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from batchrun.core.distributed.cluster import NoWorkers
from batchrun.core.distributed.config import DistributedConfig
from batchrun.core.engine.config import EngineConfig
from batchrun.core.job.config import JobConfig, JobObserver
from batchrun.core.job.journal import journal_path
from batchrun.core.job.report import report_path
from batchrun.core.job.run import run_job

from helpers import TINY_LLAMA, run_cli, spawn_batchrun, wait_for

ray = pytest.importorskip("ray")

TOPICS = ["harbour", "bakery", "orchard", "ferry", "library", "glacier", "market", "railway"]
QUESTIONS = ["When was it built?", "What is the risk?", "Who works there?", "Summarise it."]
FLAGS = ["--max-tokens", "12", "--ignore-eos", "--token-budget", "24", "--dtype", "float32"]


def write_job(path):
    """8 documents (~300 tokens each) x 4 questions behind a one-block instruction: 32 rows."""
    rows = []
    for topic in TOPICS:
        document = f"Document about the {topic}. " + f"The {topic} opened long ago and runs daily. " * 12
        for q, question in enumerate(QUESTIONS):
            prompt = f"Answer briefly.\n{document}\nQuestion: {question}"
            rows.append({"id": f"{topic}-{q}", "prompt": prompt})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job(src, out, workers=None, **kw):
    return JobConfig(
        input=src,
        model=TINY_LLAMA,
        output=out,
        sampling={"max_tokens": 12, "ignore_eos": True},
        dtype="float32",
        engine=EngineConfig(token_budget=24),
        distributed=DistributedConfig(workers=workers, **kw) if workers else None,
    )


def rows_of(path):
    """Output rows without ``cached_prompt_tokens`` (which request computed a shared prefix
    depends on where rows ran, not what was generated)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "cached_prompt_tokens"} for r in rows]


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The job in one process: (input, output, summary)."""
    folder = tmp_path_factory.mktemp("single")
    src = write_job(folder / "in.jsonl")
    summary = run_job(job(src, folder / "out.jsonl"))
    return src, folder / "out.jsonl", summary


def test_two_workers_write_what_one_process_writes(ray_address, single, tmp_path):
    src, clean, one = single
    out = tmp_path / "out.jsonl"
    summary = run_job(job(src, out, workers=2))
    assert rows_of(out) == rows_of(clean)  # the oracle's output, row for row, in row order
    stats = summary.engine
    assert [w.state for w in stats.workers] == ["done", "done"] and all(w.rows for w in stats.workers)
    assert sum(w.rows for w in stats.workers) == 32
    # the engines computed exactly the prompt tokens the split predicted, a few % over one process
    assert stats.prefill_tokens == stats.split_computed_tokens
    assert one.plan.computed_tokens <= stats.prefill_tokens <= 1.05 * one.plan.computed_tokens
    report = json.loads(report_path(out).read_text())
    assert len(report["engine"]["workers"]) == 2 and report["device"] == "ray: 2 x cpu"


class KillAWorker(JobObserver):
    """SIGKILLs the process of the first worker to return rows (as the kernel's OOM killer
    would), once, while its unit still has rows to run."""

    def __init__(self):
        self.killed = None

    def workers(self, workers):
        busy = [w for w in workers if w.rows and w.state == "ready"]
        if self.killed is None and busy:
            self.killed = busy[0].name
            os.kill(busy[0].pid, signal.SIGKILL)


def test_a_worker_killed_midway_loses_and_repeats_nothing(ray_address, single, tmp_path):
    src, clean, _ = single
    out = tmp_path / "out.jsonl"
    observer = KillAWorker()
    summary = run_job(job(src, out, workers=2), observer)
    assert observer.killed is not None
    states = {w.name: w.state for w in summary.engine.workers}
    assert states[observer.killed] == "died" and "done" in states.values()
    assert summary.engine.requeued_units >= 1
    assert [r["id"] for r in rows_of(out)] == [r["id"] for r in rows_of(clean)]  # every row once
    assert rows_of(out) == rows_of(clean)


def test_workers_that_cannot_start_fail_the_job_and_keep_the_journal(ray_address, single, tmp_path):
    src, _, _ = single
    out = tmp_path / "out.jsonl"
    with pytest.raises(NoWorkers, match="no worker could start"):
        run_job(job(src, out, workers=2, start_timeout_s=0.001))  # none loads a model in 1 ms
    assert json.loads(report_path(out).read_text())["state"] == "failed"
    assert not out.exists()


def test_a_worker_that_cannot_start_is_reported_and_the_job_goes_on(ray_address, single, tmp_path):
    src, clean, _ = single
    out = tmp_path / "out.jsonl"
    summary = run_job(job(src, out, workers=3))  # three 1-CPU workers, 2 CPUs: one never gets its CPU
    workers = summary.engine.workers
    assert sorted(w.state for w in workers) == ["done", "done", "not started"]
    assert "still loading" in next(w.error for w in workers if w.state == "not started")
    assert rows_of(out) == rows_of(clean)


@pytest.mark.slow
def test_a_driver_sigkilled_midway_resumes_in_one_process(ray_address, single, tmp_path, capsys):
    src, clean, _ = single
    out = tmp_path / "out.jsonl"
    driver = spawn_batchrun("run", src, "-o", out, "--workers", "2", "--ray-address", ray_address, *FLAGS)
    journal = journal_path(out)
    wait_for(lambda: journal.exists() and len(journal.read_text().splitlines()) >= 4, timeout=240)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not out.exists()
    assert run_cli(capsys, "status", out)[0] == 5  # interrupted (with the workers' rows, if reported)

    summary = run_job(job(src, out))  # resumed without Ray: the journal is the same either way
    assert summary.resumed >= 4 and summary.engine.requests == 32 - summary.resumed
    assert rows_of(out) == rows_of(clean)
