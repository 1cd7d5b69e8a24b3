"""OpenAI batch bodies without ``max_tokens`` / ``temperature`` get vLLM run-batch's defaults:
up to the context, and temperature 1.0 (under the job's and the model's own settings)."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from batchrun.core.checkpoint import open_checkpoint
from batchrun.core.engine.config import EngineConfig
from batchrun.core.job.config import JobConfig
from batchrun.core.job.io import open_source
from batchrun.core.job.prepare import job_defaults, read_rows, tokenize_for
from batchrun.core.job.run import run_job

from helpers import COMMON, save_tiny_model

CONTEXT = 96


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A tiny model whose context is ``CONTEXT`` tokens."""
    folder = tmp_path_factory.mktemp("short")
    return save_tiny_model(LlamaConfig(**(COMMON | {"max_position_embeddings": CONTEXT})), folder)


def batch_file(path, bodies):
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
        for i, body in enumerate(bodies)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def prepared(model, path, sampling=None):
    checkpoint = open_checkpoint(model, need_weights=False)
    source = open_source(path)
    rows = read_rows(source, job_defaults(checkpoint, sampling or {}, source))
    _, prompts, _, _ = tokenize_for(checkpoint, rows)
    return rows, prompts.lengths.tolist()


def test_a_body_without_max_tokens_or_temperature_gets_vllms_defaults(short_model, tmp_path):
    own = {"prompt": "Fog", "max_tokens": 3, "temperature": 0}
    src = batch_file(tmp_path / "b.jsonl", [{"prompt": "Granite is"}, own, {"prompt": "x " * 200}])
    (open_row, own_row, too_long), (length, _, _) = prepared(short_model, src)
    assert open_row.params.max_tokens == CONTEXT - length and open_row.params.temperature == 1.0
    assert own_row.params.max_tokens == 3 and own_row.params.greedy
    assert "fills the model's context of 96 tokens; no room to generate" in too_long.error
    # the job's options win where it sets them; --max-tokens caps, the context still bounds it
    rows, _ = prepared(short_model, src, {"max_tokens": 5, "temperature": 0.0})
    assert rows[0].params.max_tokens == 5 and rows[0].params.greedy
    rows, _ = prepared(short_model, src, {"max_tokens": 1000})
    assert rows[0].params.max_tokens == CONTEXT - length and rows[0].error is None


def test_the_models_generation_config_temperature_comes_before_openais(short_model, tmp_path):
    (short_model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "do_sample": True}))
    try:
        (row,), _ = prepared(short_model, batch_file(tmp_path / "b.jsonl", [{"prompt": "Granite is"}]))
    finally:
        (short_model / "generation_config.json").unlink()
    assert row.params.temperature == 0.6


def test_plain_jsonl_rows_keep_the_job_defaults(short_model, tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "Granite is"}\n')
    (row,), _ = prepared(short_model, src)
    assert row.params.max_tokens == 256 and row.params.greedy and not row.up_to_context


def test_up_to_the_context_runs_and_fits_a_kv_cache_smaller_than_the_context(short_model, tmp_path):
    src = batch_file(tmp_path / "b.jsonl", [{"prompt": "Granite is"}, {"prompt": "Fog is", "max_tokens": 80}])
    # 4 blocks of 16 tokens: 2 layers x 2 KV heads x 16 dims x (K, V) x 4 bytes = 512 B per token
    engine = EngineConfig(kv_cache_bytes=4 * 16 * 512)
    sampling = {"ignore_eos": True, "temperature": 0.0}
    run_job(JobConfig(input=src, model=short_model, sampling=sampling, engine=engine))
    capped, own = [json.loads(line) for line in (tmp_path / "b.out.jsonl").read_text().splitlines()]
    usage = capped["response"]["body"]["usage"]
    assert capped["error"] is None and capped["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 64  # the whole pool, not an error
    assert own["response"]["status_code"] == 400 and "needs more KV cache" in own["error"]  # its own ask
