"""Tokenization at scale: chunked, threaded batch encoding equal to the tokenizer's own
``__call__``; the token cache beside the output, reused by ``plan`` → ``run``, ``--plan``
and a resumed run, and invalidated exactly when the input, the tokenizer / template or the
columns change."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from batchrun.core.checkpoint import open_checkpoint
from batchrun.core.job import tokenize
from batchrun.core.job.config import JobConfig, JobObserver
from batchrun.core.job.io import open_source
from batchrun.core.job.plan_command import plan_job
from batchrun.core.job.plan_file import save_plan
from batchrun.core.job.prepare import job_defaults, read_and_tokenize, read_rows, tokenize_for
from batchrun.core.job.rows import Columns
from batchrun.core.job.run import run_job
from batchrun.core.job.token_cache import TokenCache, cache_path

from helpers import SAMPLE_JOBS, TINY_LLAMA


class Recorder(JobObserver):
    def __init__(self):
        self.phases, self.progress = [], []

    def phase(self, name):
        self.phases.append(name)

    def tokenized(self, done, total):
        self.progress.append((done, total))

    def reused(self):
        return any("reused" in p for p in self.phases)


@pytest.fixture(scope="module")
def checkpoint():
    return open_checkpoint(TINY_LLAMA, need_weights=False)


def mixed_rows(path, n=40):
    """Chat and raw-prompt rows, an empty prompt (a row error) and a chat with a bad field."""
    lines = []
    for i in range(n):
        if i % 3 == 0:
            lines.append({"id": i, "prompt": f"Plain prompt number {i}: " + "words " * (i % 7)})
        else:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}?"}]
            lines.append({"id": i, "messages": messages})
    lines[5] = {"id": 5, "prompt": ""}
    lines[7] = {"id": 7, "messages": [{"role": "user", "content": 3}]}
    lines[8]["max_tokens"] = -2  # a parameter error: its prompt still tokenizes the same
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def read(path, checkpoint, columns=Columns()):
    source = open_source(path, columns)
    return source, read_rows(source, job_defaults(checkpoint, {}))


def test_chunked_tokenization_equals_the_tokenizer_call(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(tokenize, "TOKENIZE_CHUNK", 7)  # many chunks, chunk edges mid-file
    _, rows = read(mixed_rows(tmp_path / "in.jsonl"), checkpoint)
    progress = []
    on_chunk = lambda done, total: progress.append((done, total))  # noqa: E731
    prompts = tokenize.tokenize_rows(rows, checkpoint.tokenizer, progress=on_chunk)
    tok = checkpoint.tokenizer
    for row in rows:
        if row.messages is not None:
            text = tok.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
            want = tok(text, add_special_tokens=False)["input_ids"]
        elif row.prompt:
            want = tok(row.prompt)["input_ids"]
        else:
            want = []
        assert prompts[row.index].tolist() == want, row.index
    assert prompts.tokens.dtype == np.int32 and len(prompts) == len(rows)
    assert progress[-1] == (len(rows), len(rows)) and len(progress) == -(-len(rows) // 7)
    assert rows[5].error and rows[7].error and rows[8].error  # empty prompt, bad content, bad param


def test_cache_hit_and_exact_invalidation(tmp_path, checkpoint):
    src = mixed_rows(tmp_path / "in.jsonl")
    out = tmp_path / "in.out.jsonl"
    source, rows = read(src, checkpoint)
    cache = TokenCache.beside(out, source, checkpoint)
    fresh = tokenize_for(checkpoint, rows, caches=[cache])
    assert not cache.hit and cache_path(out).is_dir()
    fresh_errors = [r.error for r in rows]

    def again(columns=Columns(), ckpt=checkpoint):
        source, rows = read(src, ckpt, columns)
        cache = TokenCache.beside(out, source, ckpt)
        return cache, tokenize_for(ckpt, rows, caches=[cache]), rows

    cache, cached, rows = again()
    assert cache.hit
    assert cached.prompts.digest() == fresh.prompts.digest()
    assert [r.error for r in rows] == fresh_errors  # template / tokenizer errors come back too

    # columns used
    assert not again(Columns(prompt="text"))[0].hit
    assert again()[0].hit is False  # the last miss replaced the cache
    assert again()[0].hit
    # the tokenizer's template (an override), and its keyword arguments
    other = open_checkpoint(TINY_LLAMA, need_weights=False, chat_template="{{ messages[0]['content'] }}")
    assert not again(ckpt=other)[0].hit
    assert not again()[0].hit
    kwargs = open_checkpoint(TINY_LLAMA, need_weights=False, chat_template_kwargs={"x": 1})
    assert not again(ckpt=kwargs)[0].hit
    assert not again()[0].hit
    # the input: same size and content but a new mtime, then one changed byte
    assert again()[0].hit
    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert not again()[0].hit
    assert again()[0].hit
    text = src.read_text()
    src.write_text(text.replace("Q10?", "Q11?"))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same mtime as the cache's
    assert not again()[0].hit
    # a damaged cache is ignored and rewritten
    assert again()[0].hit
    with open(cache_path(out) / "tokens.bin", "r+b") as f:
        f.truncate(8)
    cache, tokens, _ = again()
    assert not cache.hit and tokens.prompts.num_tokens > 2


def test_plan_then_run_reuses_the_plans_tokens(tmp_path):
    src = tmp_path / "docs.jsonl"
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", src)
    report, plan = plan_job(src, TINY_LLAMA)
    default_cache = cache_path(src.with_name("docs.out.jsonl"))
    assert default_cache.is_dir()
    saved = tmp_path / "plan.json"
    save_plan(plan, saved, src, TINY_LLAMA.name)

    reference = tmp_path / "ref.jsonl"
    shutil.copy(src, reference)
    recorder = Recorder()
    run_job(JobConfig(input=reference, model=TINY_LLAMA, sampling={"max_tokens": 4}), recorder)
    assert not recorder.reused()

    recorder = Recorder()
    out = tmp_path / "elsewhere.jsonl"  # -o elsewhere still finds the plan's cache
    config = JobConfig(input=src, model=TINY_LLAMA, output=out, sampling={"max_tokens": 4}, plan_file=saved)
    run_job(config, recorder)
    assert recorder.reused() and recorder.progress[-1] == (12, 12)
    assert not default_cache.exists() and not cache_path(out).exists()  # removed with the journal
    strip = lambda p: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k != "cached_prompt_tokens"}
        for line in p.read_text().splitlines()
    ]
    assert strip(out) == strip(tmp_path / "ref.out.jsonl")


class CrashAfter(JobObserver):
    def __init__(self, n):
        self.n = n

    def row_finished(self, result):
        self.n -= 1
        if self.n <= 0:
            raise RuntimeError("crash")


def test_resumed_run_reuses_its_tokens(tmp_path):
    src = tmp_path / "docs.jsonl"
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", src)
    out = tmp_path / "out.jsonl"
    config = JobConfig(input=src, model=TINY_LLAMA, output=out, sampling={"max_tokens": 4})
    with pytest.raises(RuntimeError):
        run_job(config, CrashAfter(5))
    assert cache_path(out).is_dir()  # kept for the resume, like the journal
    recorder = Recorder()
    summary = run_job(config, recorder)
    assert recorder.reused() and summary.resumed >= 4
    assert not cache_path(out).exists()
    assert len(out.read_text().splitlines()) == 12


def test_rows_are_tokenized_as_they_are_read_and_their_text_dropped(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr("batchrun.core.job.prepare.TOKENIZE_CHUNK", 6)
    src = mixed_rows(tmp_path / "in.jsonl")
    source, rows = read(src, checkpoint)
    want = tokenize.tokenize_rows(rows, checkpoint.tokenizer)
    progress = []
    read_rows = read_and_tokenize(
        source, job_defaults(checkpoint, {}), checkpoint, progress=lambda d, t: progress.append((d, t))
    )
    assert read_rows.tokenized.prompts.digest() == want.digest()
    assert [r.error for r in read_rows.rows] == [r.error for r in rows]
    assert all(r.prompt is None and r.messages is None for r in read_rows.rows)
    assert progress[0] == (6, 0) and progress[-1] == (40, 40)  # the total is known at the end
