"""Output in the format its name says (JSONL <-> Parquet, datasets folders to either),
compressed JSONL in and out, Parquet shards (folders and globs) and ``--limit``."""

from __future__ import annotations

import gzip
import json
import subprocess

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.core.errors import InputError
from batchrun.core.job.config import JobConfig
from batchrun.core.job.journal import journal_path
from batchrun.core.job.rows import GENERATED_COLUMNS
from batchrun.core.job.run import run_job

from helpers import run_cli

GENERATED = list(GENERATED_COLUMNS[:6])
ROWS = [
    {"id": "a", "prompt": "Lighthouses are", "meta": {"src": "web", "n": 1}, "score": 1},
    {"id": "b", "prompt": "Granite is", "score": 2.5, "tags": ["x", "y"]},  # int column turns float
    {"id": "c", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
]


def job(tiny_llama, path, **kw):
    return run_job(JobConfig(input=path, model=tiny_llama, sampling={"max_tokens": 2}, **kw))


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path, opener=open):
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_jsonl_to_parquet_keeps_every_column_and_row(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    job(tiny_llama, src, output=tmp_path / "out.parquet")
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.names == ["id", "prompt", "meta", "score", "tags", "messages", "max_tokens", *GENERATED]
    assert out.schema.field("score").type == pa.float64()
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c"] and [r["score"] for r in rows] == [1.0, 2.5, None]
    assert rows[0]["meta"] == {"src": "web", "n": 1} and rows[1]["tags"] == ["x", "y"]
    assert rows[2]["messages"] == [{"role": "user", "content": "Hi"}]
    assert [r["output_tokens"] for r in rows] == [2, 2, 1] and all(r["error"] is None for r in rows)
    assert not journal_path(tmp_path / "out.parquet").exists()


def test_jsonl_that_parquet_cannot_type_is_refused_before_any_work(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "label": "yes"}, {"prompt": "b", "label": 3}])
    with pytest.raises(InputError, match="cannot be written as Parquet.*'label'.*write JSONL"):
        job(tiny_llama, src, output=tmp_path / "out.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_parquet_and_datasets_to_jsonl_and_datasets_to_parquet(tiny_llama, tmp_path):
    table = pa.table({"prompt": ["Granite is", "Fog is", "Rain is"], "k": [1, 2, 3]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)
    job(tiny_llama, tmp_path / "in.parquet", output=tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [(o["prompt"], o["k"], o["output_tokens"]) for o in out] == [
        ("Granite is", 1, 2),
        ("Fog is", 2, 2),
        ("Rain is", 3, 2),
    ]
    datasets.Dataset(table).save_to_disk(str(tmp_path / "ds"))
    job(tiny_llama, tmp_path / "ds", output=tmp_path / "ds.parquet")
    converted = pq.read_table(tmp_path / "ds.parquet")
    assert converted.schema.names == ["prompt", "k", *GENERATED]
    assert converted.column("output").to_pylist() == [o["output"] for o in out]


def test_parquet_to_stdout_as_jsonl(capsys, tmp_path):
    pq.write_table(pa.table({"prompt": ["Granite is", "Fog is"]}), tmp_path / "in.parquet")
    code, out, err = run_cli(capsys, "run", tmp_path / "in.parquet", "-o", "-", "--max-tokens", "1")
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["Granite is", "Fog is"]


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_jsonl_in_and_out(tiny_llama, tmp_path, suffix):
    src = tmp_path / f"in.jsonl{suffix}"
    if suffix == ".gz":
        write_jsonl(src, ROWS, gzip.open)
    else:
        (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        subprocess.run(["zstd", "-q", str(tmp_path / "plain.jsonl"), "-o", str(src)], check=True)
    summary = job(tiny_llama, src)
    assert summary.output == tmp_path / f"in.out.jsonl{suffix}"  # compressed the same way
    if suffix == ".gz":
        out = read_jsonl(summary.output, gzip.open)
    else:
        text = subprocess.run(["zstd", "-dc", str(summary.output)], capture_output=True, check=True).stdout
        out = [json.loads(line) for line in text.decode().splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c"] and out[0]["meta"] == ROWS[0]["meta"]
    job(tiny_llama, src, output=tmp_path / "plain.out.jsonl")  # the name asks for plain text
    assert read_jsonl(tmp_path / "plain.out.jsonl")[1]["tags"] == ["x", "y"]


def test_a_damaged_gzip_is_an_input_error(tiny_llama, tmp_path):
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 50)[:40])
    with pytest.raises(InputError, match="could not be decompressed"):
        job(tiny_llama, src)


def write_shards(folder, sizes):
    folder.mkdir()
    row = 0
    for k, size in enumerate(sizes):
        ids = [f"r{row + i}" for i in range(size)]
        columns = {"id": ids, "prompt": [f"Prompt {i} about granite" for i in ids]}
        if k == 1:
            columns["extra"] = list(range(size))  # a column only this shard has
        pq.write_table(pa.table(columns), folder / f"part-{k}.parquet")
        row += size
    return folder


def test_a_folder_of_shards_gives_a_folder_of_shards(tiny_llama, tmp_path):
    data = write_shards(tmp_path / "data", [2, 3, 1])
    (data / "_SUCCESS").write_text("")
    summary = job(tiny_llama, data)
    assert summary.rows == 6 and summary.output == tmp_path / "data.out"
    names = sorted(p.name for p in summary.output.iterdir())
    assert names == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    for k, size in enumerate([2, 3, 1]):
        part = pq.read_table(summary.output / f"part-{k}.parquet")
        source = pq.read_table(data / f"part-{k}.parquet")
        assert part.num_rows == size and part.select(source.schema.names).equals(source)
        assert part.schema.names == [*source.schema.names, *GENERATED]
    # one file from every shard: their schemas unified, rows in shard-name order
    job(tiny_llama, data, output=tmp_path / "all.parquet")
    merged = pq.read_table(tmp_path / "all.parquet")
    assert merged.column("id").to_pylist() == [f"r{i}" for i in range(6)]
    assert merged.column("extra").to_pylist() == [None, None, 0, 1, 2, None]


def test_a_glob_of_shards_with_limit_and_rerun(tiny_llama, tmp_path):
    data = write_shards(tmp_path / "data", [2, 3, 1])
    pattern = data / "part-*.parquet"
    out = tmp_path / "out"
    summary = job(tiny_llama, pattern, output=out, limit=3)
    assert summary.rows == 3
    assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet", "part-1.parquet"]
    assert pq.read_table(out / "part-1.parquet").column("id").to_pylist() == ["r2"]
    summary = job(tiny_llama, pattern, output=out)  # the whole job replaces the smoke test
    assert summary.rows == 6 and len(list(out.iterdir())) == 3
    with pytest.raises(InputError, match="no Parquet files match"):
        job(tiny_llama, data / "nothing-*.parquet")
    with pytest.raises(InputError, match="not supported for Parquet shards"):
        job(tiny_llama, data, in_place=True)


def test_limit_for_run_plan_and_validate(capsys, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Row {i} is"} for i in range(5)])
    code, _, err = run_cli(capsys, "run", src, "--limit", "2", "--max-tokens", "1")
    assert code == 0, err
    assert [o["prompt"] for o in read_jsonl(tmp_path / "in.out.jsonl")] == ["Row 0 is", "Row 1 is"]
    code, out, err = run_cli(capsys, "plan", src, "--limit", "3", "--json")
    assert code == 0, err and json.loads(out)["rows"] == 3
    assert json.loads(out)["rows"] == 3
    code, out, err = run_cli(capsys, "validate", src, "--limit", "4")
    assert code == 0 and "4" in out, err
    code, _, err = run_cli(capsys, "run", src, "--limit", "2", "--in-place")
    assert code == 2 and "--in-place with --limit" in " ".join(err.split())
    code, _, err = run_cli(capsys, "run", src, "--limit", "0")
    assert code == 1 and "--limit" in err
