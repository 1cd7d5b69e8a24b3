"""The Python API (core/api.py): the job the CLI runs, as typed calls, in one process."""

from __future__ import annotations

import json
import shutil

import numpy as np

from batchrun.core import api
from batchrun.core.job.requests import make_requests
from batchrun.core.job.rows import Row
from batchrun.core.params import SamplingParams
from batchrun.core.planner.plan import build_plan
from batchrun.core.planner.prompt_tokens import PromptTokens

from helpers import SAMPLE_JOBS, TINY_LLAMA


def test_run_and_plan_through_the_api(tmp_path):
    src = tmp_path / "docs.jsonl"
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", src)
    out = tmp_path / "out.jsonl"
    summary = api.run(src, TINY_LLAMA, output=out, sampling={"max_tokens": 2}, dtype="float32")
    assert summary.rows == 12 and summary.failed == 0 and summary.output == out
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()][:2] == [
        "lighthouse-q0",
        "lighthouse-q1",
    ]
    report = api.plan(src, TINY_LLAMA, workers=3)
    assert report.summary.rows == 12 and report.split.workers == 3 and len(report.split.worker_costs) == 3


def test_load_engine_runs_requests():
    engine, loaded = api.load_engine(TINY_LLAMA, api.EngineConfig(block_size=4), dtype="float32")
    prompts = PromptTokens.from_lists([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 11]])
    plan = build_plan(prompts, np.ones(2, bool), np.array([3, 3]), 4)
    rows = [
        Row(i, str(i), f"row {i}", params=SamplingParams(max_tokens=3, ignore_eos=True)) for i in range(2)
    ]
    done = {c.row: c for c in engine.generate(make_requests(rows, prompts, plan, job_seed=0))}
    assert sorted(done) == [0, 1] and all(len(c.token_ids) == 3 for c in done.values())
    assert loaded.dtype_choice == "--dtype float32"
