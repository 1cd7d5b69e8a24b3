"""Nightly jobs never lose work: journal and resume, the output lock, error files, exit
codes, job files, logs, reports and ``batchrun status`` — including real SIGKILLs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from transformers import LlamaConfig

from batchrun.core.job.config import JobConfig, JobObserver
from batchrun.core.job.journal import journal_path
from batchrun.core.job.lock import output_lock
from batchrun.core.job.report import errors_path, report_path
from batchrun.core.job.run import run_job

from helpers import COMMON, SAMPLE_JOBS, TINY_LLAMA, batchrun, save_tiny_model


class Crash(Exception):
    pass


class CrashAfter(JobObserver):
    """Stops the job (as a crash would) once ``n`` rows have been generated."""

    def __init__(self, n):
        self.n, self.generated = n, 0

    def row_finished(self, result):
        self.generated += 1
        if self.generated >= self.n:
            raise Crash


def sample_copy(tmp_path, name="docs.jsonl"):
    src = tmp_path / name
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", src)
    return src


# Resumed rows are compared with a clean run's token for token: float32, because in bf16 (the
# bundled checkpoint's dtype, which auto keeps on CPUs with AMX / AVX-512 bf16) a row's
# numerics depend on the batch it ran in, and a resumed run batches rows differently.
EXACT = "float32"


def config(src, out, **kw):
    kw.setdefault("sampling", {"max_tokens": 6})
    kw.setdefault("dtype", EXACT)
    return JobConfig(input=src, model=kw.pop("model", TINY_LLAMA), output=out, **kw)


def rows_of(path):
    """Output rows without ``cached_prompt_tokens``: an execution statistic (which request
    happened to compute a shared prefix), not part of what was generated."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "cached_prompt_tokens"} for r in rows]


def journal_lines(out):
    return journal_path(out).read_text().splitlines()


def test_a_crashed_run_resumes_from_its_journal(tmp_path):
    src = sample_copy(tmp_path)
    clean = run_job(config(src, tmp_path / "clean.jsonl"))
    assert clean.resumed == 0 and not journal_path(tmp_path / "clean.jsonl").exists()  # done: dropped

    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        run_job(config(src, out), CrashAfter(5))
    assert len(journal_lines(out)) == 5 and not out.exists()
    assert json.loads(report_path(out).read_text())["state"] == "failed"

    resumed = run_job(config(src, out))
    assert resumed.resumed == 5
    assert resumed.engine.requests == 12 - 5  # the journal did the saving
    assert rows_of(out) == rows_of(tmp_path / "clean.jsonl")


def test_a_changed_prompt_invalidates_only_its_row(tmp_path):
    src = sample_copy(tmp_path)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        run_job(config(src, out), CrashAfter(4))
    done_ids = [json.loads(line)["id"] for line in journal_lines(out)]
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    changed = next(r for r in rows if r["id"] == done_ids[0])
    changed["messages"][-1]["content"] += " Answer in French."
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_job(config(src, out))
    assert summary.resumed == 3 and summary.failed == 0


def test_a_journal_from_another_model_or_params_is_not_used(tmp_path):
    src = sample_copy(tmp_path)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        run_job(config(src, out), CrashAfter(4))
    other = save_tiny_model(
        LlamaConfig(**COMMON | {"max_position_embeddings": 2048}), tmp_path / "other", seed=3
    )
    with pytest.raises(Crash):
        run_job(config(src, out, sampling={"max_tokens": 7}), CrashAfter(1))  # other params
    assert run_job(config(src, out, model=other)).resumed == 0


def test_a_truncated_journal_line_is_ignored(tmp_path):
    src = sample_copy(tmp_path)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        run_job(config(src, out), CrashAfter(4))
    text = journal_path(out).read_text()
    journal_path(out).write_text(text[: len(text) - 25])  # a crash in the middle of a line
    summary = run_job(config(src, out))
    assert summary.resumed == 3 and summary.failed == 0
    assert len(out.read_text().splitlines()) == 12


def test_restart_discards_the_journal(tmp_path):
    src = sample_copy(tmp_path)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        run_job(config(src, out), CrashAfter(4))
    assert run_job(config(src, out, restart=True)).resumed == 0


def test_a_second_run_on_a_locked_output_exits_75(tmp_path):
    src = sample_copy(tmp_path)
    out = tmp_path / "out.jsonl"
    with output_lock(out):
        done = batchrun("run", src, "-o", out, "--max-tokens", "2")
    assert done.returncode == 75, done.stderr
    assert f"pid {os.getpid()}" in done.stderr and not out.exists()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    out = tmp_path / "out.jsonl"
    script = (
        "import time\nfrom pathlib import Path\nfrom batchrun.core.job.lock import output_lock\n"
        f"with output_lock(Path({str(out)!r})):\n    print('locked', flush=True)\n    time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    done = batchrun("run", sample_copy(tmp_path), "-o", out, "--max-tokens", "2")
    assert done.returncode == 0, done.stderr


def test_failed_rows_go_to_errors_jsonl_and_the_error_rate_sets_the_exit_code(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"prompt": f"row {i}"} for i in range(9)] + [{"prompt": "x", "max_tokens": -1}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert batchrun("run", src, "-o", out, "--max-tokens", "2").returncode == 3
    errors = [json.loads(line) for line in errors_path(out).read_text().splitlines()]
    assert errors == [{"index": 9, "id": "9", "location": "line 10", "error": errors[0]["error"]}]
    assert "max_tokens must be >= 1" in errors[0]["error"]
    assert batchrun("run", src, "-o", out, "--max-tokens", "2", "--max-error-rate", "0.1").returncode == 0
    assert batchrun("run", src, "-o", out, "--max-tokens", "2", "--max-error-rate", "0.05").returncode == 3


def test_report_json(tmp_path):
    src = sample_copy(tmp_path)
    out = tmp_path / "out.jsonl"
    run_job(config(src, out))
    report = json.loads(report_path(out).read_text())
    assert report["state"] == "done" and report["rows"] == 12 and report["rows_ok"] == 12
    assert set(report["seconds"]) == {"read", "tokenize", "plan", "load", "generate", "write"}
    assert report["engine"]["saving"] > 0.3 and report["engine"]["peak_blocks"] > 0
    assert {"batchrun", "torch", "transformers"} <= set(report["versions"])
    assert report["model_identity"].startswith("tiny-llama:") and report["device"] == "cpu"
    assert report["plan"]["computed_tokens"] < report["plan"]["prompt_tokens"]


def test_toml_job_file_with_command_line_overrides(tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"row {i}"}) + "\n" for i in range(4)))
    job = tmp_path / "nightly.toml"
    job.write_text('input = "in.jsonl"\noutput = "out.jsonl"\nmax_tokens = 3\nignore_eos = true\n')
    assert batchrun("run", job).returncode == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["output_tokens"] for o in out] == [3] * 4  # from the file
    done = batchrun("run", job, "--max-tokens", "2")
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["output_tokens"] for o in out] == [2] * 4  # the flag wins
    job.write_text('input = "in.jsonl"\nmax_tokns = 3\n')
    done = batchrun("run", job)
    assert done.returncode == 2 and "unknown key(s) 'max_tokns'" in done.stderr


def test_log_json_lines(tmp_path):
    # --no-cuda-graphs: accepted on any device (the CPU has no graphs to turn off)
    args = ("--max-tokens", "2", "--log-json", "--log-every", "0", "--no-cuda-graphs")
    done = batchrun("run", sample_copy(tmp_path), *args)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["rows_done"] == 12 and "saving" in progress[-1]
    assert {"eta_s", "output_tokens_per_s", "kv_blocks_used"} <= set(progress[-1])


def slow_job(tmp_path):
    """A job slow enough to be killed midway: 48 rows, 24 tokens each, tiny steps."""
    src = tmp_path / "in.jsonl"
    rows = [
        {"id": f"r{i}", "prompt": f"Row {i}: " + "tell me about the harbour lighthouse. " * 6}
        for i in range(48)
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src, ["--max-tokens", "24", "--ignore-eos", "--token-budget", "8", "--dtype", EXACT]


def spawn(*args, patch=""):
    """Start ``batchrun`` in a child process, after running ``patch`` (fault injection) there."""
    code = f"import sys\n{patch}\nfrom batchrun.cli.main import main\nsys.argv[0] = 'batchrun'\nmain()"
    command = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# Fault injection for the child: hold the rename of a file called {name} for a minute, so the
# test can kill the run while the finished output sits in its temporary file.
HOLD_RENAME = """
import os, time
real_replace = os.replace
def held_replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == {name!r}:
        time.sleep(60)
    return real_replace(src, dst, *args, **kwargs)
os.replace = held_replace
"""


def wait_for(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_midway_then_resume(tmp_path):
    src, flags = slow_job(tmp_path)
    assert batchrun("run", src, "-o", tmp_path / "clean.jsonl", *flags).returncode == 0
    out = tmp_path / "out.jsonl"
    run = spawn("run", src, "-o", out, *flags)
    journal = journal_path(out)
    wait_for(lambda: journal.exists() and len(journal.read_text().splitlines()) >= 6)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not out.exists()
    status = batchrun("status", out)
    assert "interrupted" in status.stdout, status.stdout

    again = batchrun("run", src, "-o", out, *flags)
    assert again.returncode == 0, again.stderr
    report = json.loads(report_path(out).read_text())
    assert report["resumed"] >= 6 and report["engine"]["requests"] == 48 - report["resumed"]
    lines = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"r{i}" for i in range(48)]  # each row once
    assert rows_of(out) == rows_of(tmp_path / "clean.jsonl")
    assert "done" in batchrun("status", out).stdout


@pytest.mark.slow
def test_sigkill_during_the_final_write(tmp_path):
    src, flags = slow_job(tmp_path)
    assert batchrun("run", src, "-o", tmp_path / "clean.jsonl", *flags).returncode == 0
    out = tmp_path / "out.jsonl"
    out.write_text("yesterday's output\n")
    run = spawn("run", src, "-o", out, *flags, patch=HOLD_RENAME.format(name="out.jsonl"))
    wait_for(lambda: any(tmp_path.glob(".out.jsonl.tmp-*")))
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert out.read_text() == "yesterday's output\n"  # never half a file
    assert len(journal_path(out).read_text().splitlines()) == 48

    again = batchrun("run", src, "-o", out, *flags)
    assert again.returncode == 0, again.stderr
    assert json.loads(report_path(out).read_text())["resumed"] == 48  # nothing regenerated
    assert rows_of(out) == rows_of(tmp_path / "clean.jsonl")
    assert not any(tmp_path.glob(".out.jsonl.tmp-*"))


def test_a_full_disk_while_writing_keeps_the_journal_and_leaves_no_partial_output(tmp_path, monkeypatch):
    from batchrun.core.job.io import jsonl
    from batchrun.core.job.io.atomic import atomic_file

    def disk_full(self, output, results, context):
        with atomic_file(output) as tmp:
            tmp.write_text('{"half": ')
            raise OSError(28, "No space left on device")

    src = sample_copy(tmp_path)
    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as patch:
        patch.setattr(jsonl.JsonlSource, "write", disk_full)
        with pytest.raises(OSError, match="No space left"):
            run_job(config(src, out))
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.tmp-*"))
    assert len(journal_lines(out)) == 12
    assert json.loads(report_path(out).read_text())["state"] == "failed"
    assert run_job(config(src, out)).resumed == 12  # the next run only writes


def test_status_of_outputs_without_a_run(tmp_path):
    assert "not started" in batchrun("status", tmp_path / "nothing.jsonl").stdout
    (tmp_path / "old.jsonl").write_text("{}\n")
    assert "no report" in batchrun("status", tmp_path / "old.jsonl").stdout
