"""Where output may go: never onto a device, a symbolic link, another format's name or an
OpenAI request file; stdout and stdin with ``-``; ``--strict`` refuses before writing."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat

import pytest

from helpers import SAMPLE_JOBS, run_cli


@pytest.fixture
def prompts(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Lighthouses are"}\n{"id": "b", "prompt": "Granite is"}\n')
    return src


def refused(capsys, *args):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == "" and "Traceback" not in err, err
    return " ".join(err.split())  # rich wraps long lines


def test_device_nodes_and_dev_stdout_are_refused_untouched(capsys, prompts):
    message = refused(capsys, "run", prompts, "-o", "/dev/null")
    assert "/dev/null is not a regular file" in message and "-o - to write JSONL to stdout" in message
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and not os.path.exists("/dev/.null.lock")
    message = refused(capsys, "run", prompts, "-o", "/dev/stdout")
    assert "/dev/stdout is a symbolic link" in message
    assert not os.path.exists("/dev/.stdout.lock")


def test_a_fifo_and_a_symlink_are_refused(capsys, prompts, tmp_path):
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    assert "pipe.jsonl is not a regular file" in refused(capsys, "run", prompts, "-o", pipe)
    target = tmp_path / "real.jsonl"
    target.write_text("keep me\n")
    (tmp_path / "link.jsonl").symlink_to(target)
    message = refused(capsys, "run", prompts, "-o", tmp_path / "link.jsonl")
    assert "link.jsonl is a symbolic link" in message and f"-o {target}" in message
    assert (tmp_path / "link.jsonl").is_symlink() and target.read_text() == "keep me\n"


def test_an_output_name_batchrun_cannot_write_is_refused(capsys, prompts, tmp_path):
    message = refused(capsys, "run", prompts, "-o", tmp_path / "x.parquet.gz")
    assert "Parquet cannot be compressed as a whole file" in message
    message = refused(capsys, "run", prompts, "-o", tmp_path / "x.csv")
    assert "as .jsonl / .ndjson (optionally .gz or .zst) or .parquet" in message
    message = refused(capsys, "run", SAMPLE_JOBS / "openai_batch.jsonl", "-o", tmp_path / "x.parquet")
    assert "OpenAI batch response lines; name it .jsonl" in message
    assert not list(tmp_path.glob("x.*"))


def test_in_place_on_an_openai_batch_file_is_refused(capsys, tmp_path):
    src = tmp_path / "batch.jsonl"
    shutil.copy(SAMPLE_JOBS / "openai_batch.jsonl", src)
    before = src.read_bytes()
    assert "cannot replace its input" in refused(capsys, "run", src, "--in-place")
    assert "cannot replace its input" in refused(capsys, "run", src, "-o", src)
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["batch.jsonl"]


def test_strict_refuses_rows_over_the_context_before_writing(capsys, prompts, tmp_path):
    prompts.write_text(prompts.read_text() + '{"id": "c", "prompt": "Long", "max_tokens": 100000}\n')
    message = refused(capsys, "run", prompts, "--strict", "--max-tokens", "2")
    assert "1 invalid row(s) (--strict)" in message and "exceeds the model's context" in message
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["in.jsonl"]
    assert not (tmp_path / ".in.out.jsonl.report.json").exists()


def test_stdin_to_stdout(capsys, monkeypatch, prompts, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(prompts.read_bytes())))
    code, out, err = run_cli(capsys, "run", "-", "--max-tokens", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all(r["output_tokens"] == 2 for r in rows)
    assert "2 (2 ok, 0 failed)" in err  # the summary goes to stderr, stdout is all rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no side files anywhere


def test_an_input_column_batchrun_would_overwrite_is_refused_or_prefixed(capsys, tmp_path):
    src = tmp_path / "alpaca.jsonl"
    rows = [{"prompt": "Name a colour.", "output": "Blue."}, {"prompt": "Name a fruit.", "output": "Fig."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = refused(capsys, "run", src)
    assert f"{src}:1: input column(s) 'output' would be overwritten" in message
    assert "--output-prefix gen_" in message and not (tmp_path / "alpaca.out.jsonl").exists()
    for _ in range(2):  # the second run replaces its own gen_ columns and keeps the reference answers
        code, _, err = run_cli(
            capsys, "run", src, "--in-place", "--output-prefix", "gen_", "--max-tokens", "2"
        )
        assert code == 0, err
        out = [json.loads(line) for line in src.read_text().splitlines()]
        assert [o["output"] for o in out] == ["Blue.", "Fig."]
        assert all(o["gen_output_tokens"] == 2 and o["gen_error"] is None for o in out)
        assert "gen_logprobs" not in out[0] and "error" not in out[0]


def test_a_parquet_error_column_is_refused(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["Hi"], "error": ["annotator typo"], "logprobs": [2]}), src)
    message = refused(capsys, "validate", src)
    assert "input column(s) 'error' would be overwritten" in message  # logprobs = 2 is a row option
