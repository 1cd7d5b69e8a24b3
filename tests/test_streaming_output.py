"""The final output is streamed from the input and the journal in row order, with results
read back from their journal lines: byte for byte the file written from the results held in
memory (what batchrun wrote before), for JSONL and Parquet, with samples and logprobs."""

from __future__ import annotations

import json
import shutil

import pytest

from batchrun.core.job import generate as generate_module
from batchrun.core.job.config import JobConfig
from batchrun.core.job.io import STDIO, OutputContext, open_source
from batchrun.core.job.journal import journal_path
from batchrun.core.job.results import StoredResults
from batchrun.core.job.rows import RowResult
from batchrun.core.job.run import run_job

from helpers import SAMPLE_JOBS, TINY_LLAMA


@pytest.mark.parametrize(
    "name, sampling",
    [
        ("docs_qa.jsonl", {"max_tokens": 5}),
        ("docs_qa.parquet", {"max_tokens": 5}),
        ("docs_qa.jsonl", {"max_tokens": 4, "n": 2, "temperature": 0.8, "logprobs": 2}),
        ("docs_qa.parquet", {"max_tokens": 4, "n": 2, "temperature": 0.8, "logprobs": 2}),
    ],
)
def test_streamed_output_equals_the_in_memory_write(tmp_path, monkeypatch, name, sampling):
    src = tmp_path / name
    shutil.copy(SAMPLE_JOBS / name, src)
    held: dict[int, RowResult] = {}
    contexts: list[OutputContext] = []
    row_result = generate_module.row_result

    def spy(completions, prompt_tokens):
        result = row_result(completions, prompt_tokens)
        held[completions[0].row] = result
        return result

    monkeypatch.setattr(generate_module, "row_result", spy)
    write = type(open_source(src)).write

    def spy_write(self, output, results, context):
        assert isinstance(results, StoredResults) and not results.kept  # nothing held but failures
        contexts.append(context)
        write(self, output, results, context)

    monkeypatch.setattr(type(open_source(src)), "write", spy_write)
    out = tmp_path / f"out{src.suffix}"
    run_job(JobConfig(input=src, model=TINY_LLAMA, output=out, sampling=sampling))
    assert not journal_path(out).exists()

    reference = tmp_path / f"reference{src.suffix}"
    write(open_source(src), reference, [held[i] for i in range(len(held))], contexts[0])
    assert out.read_bytes() == reference.read_bytes()


def test_stdout_output_keeps_results_in_memory_and_matches_the_file(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", src)
    lines = src.read_text().splitlines()
    lines[3] = json.dumps(json.loads(lines[3]) | {"max_tokens": -3})  # a failed row, kept in memory
    src.write_text("\n".join(lines) + "\n")
    config = JobConfig(input=src, model=TINY_LLAMA, sampling={"max_tokens": 5})
    summary = run_job(config)
    assert summary.failed == 1 and summary.errors_file is not None
    capsys.readouterr()
    run_job(JobConfig(input=src, model=TINY_LLAMA, sampling={"max_tokens": 5}, output=STDIO))
    assert capsys.readouterr().out == (tmp_path / "docs.out.jsonl").read_text()
