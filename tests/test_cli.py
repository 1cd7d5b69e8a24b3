"""The installed ``batchrun`` command: the README's sample job, exit codes, messages."""

from __future__ import annotations

import json
import shutil

from helpers import SAMPLE_JOBS, batchrun


def test_sample_job_runs_with_the_bundled_model(tmp_path):
    src = tmp_path / "docs_qa.jsonl"
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", src)
    done = batchrun("run", src, "--max-tokens", "3")
    assert done.returncode == 0, done.stderr
    assert "12 (12 ok, 0 failed)" in done.stdout
    out = [json.loads(line) for line in (tmp_path / "docs_qa.out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == [json.loads(line)["id"] for line in src.read_text().splitlines()]
    assert "generating" in done.stderr  # plain progress lines when not on a terminal


def test_failed_rows_exit_3(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\n{"prompt": "x", "max_tokens": -1}\n')
    done = batchrun("run", src, "--max-tokens", "2")
    assert done.returncode == 3
    assert "1 failed" in done.stdout and "line 2: max_tokens must be >= 1" in done.stdout


def test_invalid_input_exits_2_and_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\nnot json\n')
    done = batchrun("run", src)
    assert done.returncode == 2
    assert f"{src}:2" in done.stderr and "not valid JSON" in done.stderr
    assert not (tmp_path / "in.out.jsonl").exists()


def test_usage_errors_exit_1(tmp_path):
    assert batchrun("run", SAMPLE_JOBS / "docs_qa.jsonl", "--top-p", "1.5").returncode == 1
    assert batchrun("run", SAMPLE_JOBS / "docs_qa.jsonl", "--kv-memory", "lots").returncode == 1
    assert batchrun("run", SAMPLE_JOBS / "docs_qa.jsonl", "--no-such-flag").returncode == 1


def test_validate_reports_without_running(tmp_path):
    done = batchrun(
        "validate", SAMPLE_JOBS / "docs_qa.parquet", "--model", SAMPLE_JOBS / "models" / "tiny-llama"
    )
    assert done.returncode == 0, done.stderr
    assert "parquet" in done.stdout and "12 (12 valid)" in done.stdout and "prompt tokens" in done.stdout


def test_help_documents_exit_codes():
    done = batchrun("--help")
    assert done.returncode == 0 and "3  finished, but more rows failed" in done.stdout
    assert "75 the output is locked" in done.stdout
    run_help = batchrun("run", "--help")
    assert run_help.returncode == 0 and "75 the output is locked" in run_help.stdout
