"""Every format comes back with one output row per input row, in order, inputs kept."""

from __future__ import annotations

import json
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.core.job.config import JobConfig
from batchrun.core.job.rows import GENERATED_COLUMNS, Columns
from batchrun.core.job.run import run_job

from helpers import SAMPLE_JOBS

GENERATED = set(GENERATED_COLUMNS)


def job(tiny_llama, path, **kw):
    return run_job(JobConfig(input=path, model=tiny_llama, sampling={"max_tokens": 4}, **kw))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_keeps_rows_columns_and_order(tiny_llama, tmp_path):
    rows = [
        {"id": "b", "prompt": "Tell me about lighthouses.", "extra": {"k": [1, 2]}},
        {"prompt": "Second row, no id.", "max_tokens": 2, "score": 0.5},
        {"id": 7, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7, "seed": 3},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # trailing blank line is ignored
    summary = job(tiny_llama, src)
    out = read_jsonl(tmp_path / "in.out.jsonl")
    assert summary.rows == 3 and summary.failed == 0
    assert [{k: v for k, v in o.items() if k not in GENERATED} for o in out] == rows
    assert [o["finish_reason"] for o in out] == ["length", "length", "length"]
    assert [o["output_tokens"] for o in out] == [4, 2, 4]
    assert all(o["error"] is None and isinstance(o["output"], str) for o in out)


def test_parquet_keeps_schema_and_order(tiny_llama, tmp_path):
    src = tmp_path / "p.parquet"
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(5)],
            "prompt": [f"Prompt number {i} about apples." for i in range(5)],
            "max_tokens": pa.array([3, None, 2, None, 1], type=pa.int64()),
            "weight": [0.1, 0.2, 0.3, 0.4, 0.5],
        }
    )
    pq.write_table(table, src, row_group_size=2)
    job(tiny_llama, src, output=tmp_path / "o.parquet")
    out = pq.read_table(tmp_path / "o.parquet")
    generated = ["output", "prompt_tokens", "cached_prompt_tokens", "output_tokens", "finish_reason", "error"]
    assert out.schema.names == ["id", "prompt", "max_tokens", "weight", *generated]
    assert out.select(table.schema.names).equals(table)
    assert out.column("output_tokens").to_pylist() == [3, 4, 2, 4, 1]


def test_openai_batch_output_format(tiny_llama, tmp_path):
    src = SAMPLE_JOBS / "openai_batch.jsonl"
    requests = read_jsonl(src)
    job(tiny_llama, src, output=tmp_path / "o.jsonl")
    out = read_jsonl(tmp_path / "o.jsonl")
    assert [o["custom_id"] for o in out] == [r["custom_id"] for r in requests]
    first = out[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny-llama"
    assert body["choices"][0]["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["completion_tokens"] == requests[0]["body"]["max_tokens"]  # the row's own limit wins
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # vLLM run-batch's line shape; every id is unique (not a row number repeated across batches)
    assert list(first) == ["id", "custom_id", "response", "error"]
    assert list(first["response"]) == ["status_code", "request_id", "body"]
    assert sum(o["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] for o in out) > 0
    ids = [o["id"] for o in out] + [o["response"]["request_id"] for o in out]
    job(tiny_llama, src, output=tmp_path / "again.jsonl")
    ids += [o["id"] for o in read_jsonl(tmp_path / "again.jsonl")]
    assert len(set(ids)) == len(ids)


def test_openai_batch_body_options(tiny_llama, tmp_path):
    src = tmp_path / "b.jsonl"
    chat = "/v1/chat/completions"
    parts = [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One word."}]
    bodies = [
        {
            "messages": [{"role": "user", "content": parts}],
            "max_tokens": 2,
            "logprobs": True,
            "top_logprobs": 2,
        },
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 2, "temperature": 1.0},
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "presence_penalty": 0.5,
            "min_p": 0.1,
        },
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_object"}},
    ]
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": chat, "body": b} for i, b in enumerate(bodies)]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    job(tiny_llama, src)
    parts_row, samples, penalty, image, response_format = read_jsonl(tmp_path / "b.out.jsonl")
    choice = parts_row["response"]["body"]["choices"][0]
    assert isinstance(choice["message"]["content"], str) and parts_row["error"] is None
    top = choice["logprobs"]["content"][0]
    assert top["bytes"] == list(top["token"].encode()) and len(top["top_logprobs"]) == 2
    assert [c["index"] for c in samples["response"]["body"]["choices"]] == [0, 1]
    assert penalty["error"] is None and penalty["response"]["status_code"] == 200  # vLLM's extra keys apply
    for line, text in [
        (image, "'image_url' part; only text parts are supported"),
        (response_format, "body.response_format"),
    ]:
        assert line["response"]["status_code"] == 400 and line["response"]["body"] is None
        assert text in line["error"]


def test_openai_batch_unsupported_request_is_a_row_error(tiny_llama, tmp_path):
    src = tmp_path / "b.jsonl"
    lines = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "Hello", "max_tokens": 2},
        },
        {"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines))
    summary = job(tiny_llama, src)
    out = read_jsonl(tmp_path / "b.out.jsonl")
    assert summary.failed == 1
    assert out[0]["response"]["body"]["object"] == "text_completion"
    assert "text" in out[0]["response"]["body"]["choices"][0]
    assert out[1]["response"]["body"] is None and out[1]["response"]["status_code"] == 400
    assert "/v1/embeddings" in out[1]["error"] and "line 2" in out[1]["error"]


def test_datasets_folder(tiny_llama, tmp_path):
    ds = datasets.Dataset.from_dict({"question": ["What is granite?", "Why bake rye?"], "n": [1, 2]})
    ds.save_to_disk(str(tmp_path / "ds"))
    job(tiny_llama, tmp_path / "ds", columns=Columns(prompt="question"))
    out = datasets.load_from_disk(str(tmp_path / "ds.out"))
    assert out["question"] == ds["question"] and out["n"] == [1, 2]
    assert out["finish_reason"] == ["length", "length"]


@pytest.mark.parametrize("name", ["docs_qa.jsonl", "docs_qa.parquet"])
def test_in_place_replaces_the_input_and_is_rerunnable(tiny_llama, tmp_path, name):
    src = tmp_path / name
    shutil.copy(SAMPLE_JOBS / name, src)
    job(tiny_llama, src, in_place=True)
    first = src.read_bytes()
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"
    job(tiny_llama, src, in_place=True)  # generated columns are replaced, not duplicated
    assert src.read_bytes() == first
    # Beside the output only the run's report and lock file remain (no temporaries, no journal).
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{name}.lock", f".{name}.report.json", name]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_n_samples_and_logprobs_columns(tiny_llama, tmp_path, suffix):
    rows = [
        {"id": "a", "prompt": "Name three apples and a pear. " * 8, "n": 2, "temperature": 1.0, "seed": 5},
        {"id": "b", "prompt": "Name three apples and a plum."},
        {"id": "c", "prompt": "bad", "max_tokens": -1},
    ]
    src = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = sorted({k for r in rows for k in r})
        pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in keys}), src)
    (tmp_path / "out").mkdir()
    out_path = tmp_path / "out" / f"out{suffix}"
    run_job(
        JobConfig(input=src, model=tiny_llama, output=out_path, sampling={"max_tokens": 3, "logprobs": 2})
    )
    out = read_jsonl(out_path) if suffix == ".jsonl" else pq.read_table(out_path).to_pylist()
    a, b, c = out
    assert len(a["output"]) == 2 and a["output_tokens"] == 6 and len(a["logprobs"]) == 2
    assert len(b["output"]) == 1 and b["output_tokens"] == 3  # a list for every row: one schema
    assert c["output"] is None and c["finish_reason"] == "error" and c["logprobs"] is None
    step = b["logprobs"][0][0]
    assert len(step["top"]) == 2 and step["logprob"] <= 0 and step["top"][0]["logprob"] >= step["logprob"]
    # The second sample of row a read the prompt its first sample computed.
    assert a["cached_prompt_tokens"] > 0
    # The side files (lock, report, errors) are hidden: folder readers see only the output.
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        f"out{suffix}",
        f".out{suffix}.lock",
        f".out{suffix}.report.json",
        f".out{suffix}.errors.jsonl",
    }
    if suffix == ".parquet":
        import pyarrow.dataset

        assert pyarrow.dataset.dataset(tmp_path / "out", format="parquet").to_table().num_rows == 3


def test_pandas_style_float_columns_of_integers_are_accepted(tiny_llama, tmp_path):
    # pandas turns an optional integer column into float64 (2.0, NaN -> null); 2.5 stays an error
    src = tmp_path / "in.parquet"
    table = pa.table(
        {"prompt": ["a b", "c d", "e f"], "max_tokens": [2.0, None, 2.5], "seed": [1.0, 2.0, 3.0]}
    )
    pq.write_table(table, src)
    summary = job(tiny_llama, src)
    out = pq.read_table(tmp_path / "in.out.parquet").to_pylist()
    assert [o["output_tokens"] for o in out[:2]] == [2, 4] and summary.failed == 1
    assert "max_tokens must be an integer, got 2.5" in out[2]["error"]
