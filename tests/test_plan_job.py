"""``batchrun plan`` end to end: the report, saved plans and their checks, bad input."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from batchrun.core import checkpoint
from batchrun.core.engine.config import EngineConfig
from batchrun.core.errors import InputError
from batchrun.core.job.config import JobConfig
from batchrun.core.job.plan_command import plan_job
from batchrun.core.job.plan_file import save_plan
from batchrun.core.job.run import run_job

from helpers import SAMPLE_JOBS, TINY_LLAMA, batchrun


def test_plan_json_on_the_sample(tmp_path):
    saved = tmp_path / "plan.json"
    done = batchrun("plan", SAMPLE_JOBS / "docs_qa.jsonl", "--json", "--top", "3", "--save", saved)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key in ("rows", "prompt_tokens", "computed_tokens", "saving", "segments", "lru_computed_tokens"):
        assert key in report
    assert report["rows"] == 12
    # One system prompt shared by all twelve rows, one document by each three questions.
    assert report["segments"][0]["users"] == 12 and report["segments"][0]["depth"] == 1
    assert report["computed_tokens"] <= report["lru_computed_tokens"] <= report["prompt_tokens"]
    assert 0 < report["saving"] == pytest.approx(1 - report["computed_tokens"] / report["prompt_tokens"])
    assert len(report["segments"]) == 3 and saved.is_file()


def test_plan_tables_on_the_sample():
    done = batchrun("plan", SAMPLE_JOBS / "docs_qa.parquet", "--top", "2")
    assert done.returncode == 0, done.stderr
    for text in ("tokens to compute", "LRU prefix cache", "batchrun plan", "shared segments", "system"):
        assert text in done.stdout


def test_a_saved_plan_runs_and_gives_the_same_outputs(tmp_path):
    src = tmp_path / "docs.jsonl"
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", src)
    report, plan = plan_job(src, TINY_LLAMA, sampling={"max_tokens": 4}, block_size=8)
    save_plan(plan, tmp_path / "plan.json", src, TINY_LLAMA.name)
    planned = run_job(
        JobConfig(
            input=src,
            model=TINY_LLAMA,
            output=tmp_path / "a.jsonl",
            sampling={"max_tokens": 4},
            plan_file=tmp_path / "plan.json",
            engine=EngineConfig(block_size=8),
        )
    )
    fresh = run_job(
        JobConfig(
            input=src,
            model=TINY_LLAMA,
            output=tmp_path / "b.jsonl",
            sampling={"max_tokens": 4},
            engine=EngineConfig(block_size=8),
        )
    )
    assert planned.plan.computed_tokens == report.summary.computed_tokens == fresh.plan.computed_tokens
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


@pytest.mark.parametrize(
    "change, message",
    [
        ("other input", "planned for other prompts or another tokenizer"),
        ("block size", "planned with --block-size 16"),
        ("max tokens", "schedules a different set of rows"),
        ("damaged", "damaged plan file"),
        ("missing", "no plan file"),
    ],
)
def test_a_plan_for_something_else_is_refused(tmp_path, change, message):
    src = tmp_path / "docs.jsonl"
    rows = [json.loads(line) for line in (SAMPLE_JOBS / "docs_qa.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k != "max_tokens"} for r in rows]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, plan = plan_job(src, TINY_LLAMA, sampling={"max_tokens": 4})
    plan_file = tmp_path / "plan.json"
    save_plan(plan, plan_file, src, TINY_LLAMA.name)
    config = {"input": src, "model": TINY_LLAMA, "sampling": {"max_tokens": 4}, "plan_file": plan_file}
    if change == "other input":
        lines = src.read_text().splitlines()
        src.write_text("\n".join(lines[:-1]) + "\n")
    elif change == "block size":
        config["engine"] = EngineConfig(block_size=8)
    elif change == "max tokens":
        config["sampling"] = {"max_tokens": 2000}  # now some rows exceed the 2048-token context
    elif change == "damaged":
        data = json.loads(plan_file.read_text())
        del data["segments"]
        plan_file.write_text(json.dumps(data))
    elif change == "missing":
        plan_file.unlink()
    with pytest.raises(InputError, match=message):
        run_job(JobConfig(**config))


def test_plan_of_an_empty_file_exits_2(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    done = batchrun("plan", src)
    assert done.returncode == 2 and "empty" in done.stderr


class FailsOnBoom:
    """A tokenizer that raises on any text containing BOOM (as a broken tokenizer would)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, texts, **kw):
        if any("BOOM" in t for t in texts):
            raise RuntimeError("tokenizer exploded")
        return self.inner(texts, **kw)


def test_a_row_the_tokenizer_fails_on_is_marked_and_the_plan_goes_on(tmp_path, monkeypatch):
    real = checkpoint.AutoTokenizer.from_pretrained  # `plan` tokenizes with the checkpoint's tokenizer
    patched = SimpleNamespace(from_pretrained=lambda path, **kw: FailsOnBoom(real(path, **kw)))
    monkeypatch.setattr(checkpoint, "AutoTokenizer", patched)
    src = tmp_path / "in.jsonl"
    rows = [{"prompt": "a shared preamble, then question one"}, {"prompt": "BOOM"}]
    rows += [{"prompt": "a shared preamble, then question two"}, {"prompt": "x " * 3000}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report, plan = plan_job(src, TINY_LLAMA, block_size=1)
    assert report.invalid_rows == 1  # the BOOM row
    assert report.over_context_count == 1 and "line 4" in report.over_context_rows[0]
    assert sorted(plan.order.tolist()) == [0, 2]
    assert report.summary.runnable_rows == 2 and report.summary.shared_segments == 1
