"""The installed ``batchrun`` command: the README's sample job, exit codes, messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from batchrun.core.sizes import parse_memory

from helpers import SAMPLE_JOBS, batchrun, run_cli


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "Missing argument"),
        (["run", "x.jsonl", "--no-such-flag"], "No such option: --no-such-flag"),
        (["run", "x.jsonl", "--device", "gpu"], "'gpu' is not one of"),
        (["run", "x.jsonl", "--max-tokens", "many"], "Invalid value for '--max-tokens'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["run", "x.jsonl", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["run", "x.jsonl", "--kv-memory", "lots"], "cannot read memory size 'lots'"),
        (["run", "x.jsonl", "--kv-memory", "2"], "a bare number is a fraction of free memory"),
        (["plan", "x.jsonl", "--kv-memory", "8 parsecs"], "cannot read memory size"),
    ],
)
def test_usage_errors_print_one_line_and_exit_1(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 1, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_bare_batchrun_shows_help_and_version_prints(capsys):
    code, out, err = run_cli(capsys)
    assert code == 0 and "Usage: batchrun" in out and "run " in out and err == ""
    code, out, err = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("batchrun ") and err == ""


def test_memory_sizes_in_the_usual_spellings():
    assert parse_memory("8GiB") == parse_memory("8G") == parse_memory("8g") == 8 * 2**30
    assert parse_memory("512MB") == 512 * 10**6 and parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("0.5") == 0.5 and parse_memory("1") == 1.0
    for bad in ("2", "0", "-1G", "8 parsecs", "G"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_help_and_status_do_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from batchrun.cli.main import cli\n"
        "for args in (['--help'], ['run', '--help'], ['plan', '--help'], ['validate', '--help'],"
        f" ['status', {str(tmp_path / 'out.jsonl')!r}], ['--version']):\n"
        "    cli(args)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'datasets'))\n"
        "print('HEAVY', heavy[:5])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


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


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('max_tokens = "4"', "max_tokens = '4' is not valid (expected an integer)"),
        ("max_tokens = -3", "max_tokens = -3 is not valid (max_tokens must be >= 1"),
        ("top_p = 1.5", "top_p = 1.5 is not valid (top_p must be in (0, 1]"),
        ('kv_memory = "2"', "kv_memory = '2' is not valid (a bare number is a fraction"),
        ("strict = 1", "strict = 1 is not valid (expected true or false)"),
        ('device = "gpu"', "device = 'gpu' is not valid"),
    ],
)
def test_job_file_values_are_checked_and_name_the_file(capsys, tmp_path, line, message):
    job = tmp_path / "nightly.toml"
    job.write_text(f'input = "in.jsonl"\n{line}\n')
    code, out, err = run_cli(capsys, "run", job)
    assert code == 2, err
    assert f"{job}: {message}" in " ".join(err.split()) and "Traceback" not in err


def test_plan_and_validate_accept_run_job_files(capsys, tmp_path):
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", tmp_path / "in.jsonl")
    job = tmp_path / "nightly.toml"
    model = SAMPLE_JOBS / "models" / "tiny-llama"
    job.write_text(f'input = "in.jsonl"\nmodel = "{model}"\nmax_tokens = 3\nlog_every = 60\nstrict = true\n')
    code, out, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    assert "12 (12 valid)" in out and "prompt tokens" in out  # the job file's model tokenized it
    code, out, err = run_cli(capsys, "plan", job, "--json")
    assert code == 0, err
    assert json.loads(out)["rows"] == 12 and json.loads(out)["input"] == str(tmp_path / "in.jsonl")
