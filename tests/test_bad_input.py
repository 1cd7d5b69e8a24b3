"""Bad input gets a message naming the file, line/row and field, and loses nothing.

File-level problems (unreadable file, duplicate ids, bad model folder) stop the job before
anything runs and write nothing. Row-level problems give that row an error record and the
job goes on; ``strict=True`` (``--strict``) refuses the file instead.
"""

from __future__ import annotations

import json
import shutil

import pytest

from batchrun.core.errors import InputError
from batchrun.core.job.config import JobConfig
from batchrun.core.job.run import run_job
from batchrun.core.job.validate import validate_file


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def assert_refused(tiny_llama, src, *fragments, model=None, **kw):
    before = sorted(p.name for p in src.parent.iterdir())
    with pytest.raises(InputError) as info:
        run_job(JobConfig(input=src, model=model or tiny_llama, sampling={"max_tokens": 2}, **kw))
    for fragment in fragments:
        assert fragment in str(info.value)
    assert sorted(p.name for p in src.parent.iterdir()) == before, "something was written"
    return str(info.value)


def test_malformed_json_line(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, '{"prompt": "broken",'])
    assert_refused(tiny_llama, src, f"{src}:2", "not valid JSON")


def test_json_line_that_is_not_an_object(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, "[1, 2]"])
    assert_refused(tiny_llama, src, f"{src}:2", "expected a JSON object")


def test_duplicate_ids_listed_with_lines(tiny_llama, tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}],
    )
    assert_refused(tiny_llama, src, "unique", "id 'a' at line 3 (first at line 1)")


def test_empty_file(tiny_llama, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("")
    assert_refused(tiny_llama, src, str(src), "empty")
    src.write_text("\n\n")
    assert_refused(tiny_llama, src, str(src), "no rows")


def test_unknown_extension(tiny_llama, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("prompt\nhello\n")
    assert_refused(tiny_llama, src, "unknown file type '.csv'", ".jsonl")


def test_missing_model_folder(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    assert_refused(None, src, "does not exist", "--model", model=tmp_path / "nope")


def test_model_folder_without_tokenizer(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    assert_refused(tiny_llama, src, "has no tokenizer", model=model)


def test_unsupported_architecture(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text()) | {"model_type": "bert"}
    (model / "config.json").write_text(json.dumps(config))
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    assert_refused(tiny_llama, src, "'bert' is not supported", "llama", model=model)


BAD_ROWS = [
    ({"id": "a", "text": "no prompt field"}, "line 1", "neither 'prompt' nor 'messages'"),
    ({"id": "b", "prompt": 42}, "line 2", "'prompt' must be a non-empty string"),
    ({"id": "c", "prompt": "x", "max_tokens": -3}, "line 3", "max_tokens must be >= 1"),
    ({"id": "d", "prompt": "x", "temperature": "hot"}, "line 4", "temperature must be a number"),
    ({"id": "e", "messages": [{"role": "user"}]}, "line 5", "messages[0].content must be a string"),
    ({"id": "f", "prompt": "x", "stop": 5}, "line 6", "stop must be a string"),
]


def test_bad_rows_get_error_records_and_the_job_goes_on(tiny_llama, tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl", [row for row, _, _ in BAD_ROWS] + [{"id": "ok", "prompt": "fine"}]
    )
    summary = run_job(JobConfig(input=src, model=tiny_llama, sampling={"max_tokens": 2}))
    out = [json.loads(line) for line in (tmp_path / "in.out.jsonl").read_text().splitlines()]
    assert summary.failed == len(BAD_ROWS) and len(out) == len(BAD_ROWS) + 1
    for record, (_, where, what) in zip(out[:-1], BAD_ROWS, strict=True):
        assert record["finish_reason"] == "error" and record["output"] is None
        assert where in record["error"] and what in record["error"]
    assert out[-1]["finish_reason"] == "length" and out[-1]["error"] is None


def test_strict_refuses_a_file_with_bad_rows(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [row for row, _, _ in BAD_ROWS])
    message = assert_refused(tiny_llama, src, "6 invalid row(s)", strict=True)
    assert "line 3: max_tokens must be >= 1" in message


def test_prompt_beyond_the_context_is_a_row_error(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "word " * 3000}, {"prompt": "short"}])
    summary = run_job(JobConfig(input=src, model=tiny_llama, sampling={"max_tokens": 2}))
    out = [json.loads(line) for line in (tmp_path / "in.out.jsonl").read_text().splitlines()]
    assert summary.failed == 1
    assert "exceeds the model's context of 2048 tokens" in out[0]["error"] and "line 1" in out[0]["error"]
    assert out[1]["finish_reason"] == "length"


def test_validate_reports_problems_and_token_lengths(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello there"}, {"prompt": "x", "max_tokens": 0}])
    report = validate_file(src, model=tiny_llama)
    assert report.rows == 2 and report.format_name == "jsonl"
    assert report.problems == ["line 2: max_tokens must be >= 1, got 0"]
    assert len(report.token_lengths) == 1 and report.token_lengths[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
