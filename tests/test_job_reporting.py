"""What a run tells its user: the start line, a time-driven heartbeat, an honest summary
after a resume, Ctrl-C and engine failures with the rows kept, and ``status`` for scripts."""

from __future__ import annotations

import io
import json
import re
import shutil

from rich.console import Console

from batchrun.cli.progress import ConsoleObserver
from batchrun.core.job.config import StepStats
from batchrun.core.job.rows import RowResult
from batchrun.core.runner.model_loader import load_model

from helpers import SAMPLE_JOBS, run_cli, run_engine


def flat(text):
    return " ".join(text.split())


def test_heartbeat_comes_from_the_clock_not_from_finished_rows():
    now = [0.0]
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    observer = ConsoleObserver(console, log_every=3, clock=lambda: now[0])
    observer.started(4, prompt_tokens=100, expected_output_tokens=400)
    now[0] = 2.0
    observer.step(StepStats(100, 20, kv_blocks_used=5, kv_blocks=9, output_tokens=24))
    assert console.file.getvalue() == ""  # not yet due
    now[0] = 4.0
    observer.step(StepStats(100, 40, kv_blocks_used=6, kv_blocks=9, output_tokens=44))
    lines = console.file.getvalue().splitlines()
    # output tokens: 40 decoded + the 4 that the prompts' last positions sampled, over 4 s
    assert len(lines) == 1 and "rows 0/4" in lines[0] and "11.0 output tok/s" in lines[0]
    # 360 tokens left (4 rows x 100 expected - 40 decoded) at 140 tokens / 4 s
    assert "ETA 10s" in lines[0] and "KV 6/9 blocks" in lines[0]
    now[0] = 5.0
    observer.row_finished(RowResult("text", 25, 10, "stop"))  # a row used 10 of its 100
    assert len(console.file.getvalue().splitlines()) == 1  # a finished row alone is not a reason
    now[0] = 8.0
    observer.step(StepStats(prefill_tokens=100, decode_tokens=55, kv_blocks_used=4, kv_blocks=9))
    last = console.file.getvalue().splitlines()[-1]
    # 3 rows left at 10 tokens each, 45 already decoding: the ETA follows what rows really use
    assert "rows 1/4" in last and "ETA 0s" in last
    for _ in range(3):
        observer.row_finished(RowResult("text", 25, 10, "stop"))
    assert "rows 4/4" in console.file.getvalue().splitlines()[-1]  # the last row always reports


def test_output_tokens_count_what_prompts_sample_with_no_decode_at_all():
    """``--max-tokens 1``: every row's one token comes from its prompt's last position, so no
    position is decoded, and the output rate is still the rows' tokens, not zero."""
    now = [0.0]
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    observer = ConsoleObserver(console, log_every=0, clock=lambda: now[0])
    observer.started(10, prompt_tokens=500, expected_output_tokens=10)
    now[0] = 2.0
    observer.step(StepStats(prefill_tokens=300, decode_tokens=0, output_tokens=6))
    assert "3.0 output tok/s" in console.file.getvalue().splitlines()[-1]


def test_engine_counts_every_sampled_token(tiny_llama):
    loaded = load_model(tiny_llama, device="cpu", dtype="float32")
    _, engine = run_engine(loaded, [[5, 6, 7], [5, 6, 8, 9]], max_tokens=[1, 3])
    # 1 + 3 tokens sampled; only the second row's last 2 came from decoded positions
    assert engine.stats.sampled_tokens == 4 and engine.stats.decode_tokens == 2


def test_resumed_rows_do_not_inflate_the_throughput():
    now = [0.0]
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    observer = ConsoleObserver(console, log_every=0, clock=lambda: now[0])
    observer.started(10, prompt_tokens=50, expected_output_tokens=50)
    observer.rows_resumed(8)
    now[0] = 2.0
    observer.step(StepStats(prefill_tokens=50, decode_tokens=10, output_tokens=10))
    last = console.file.getvalue().splitlines()[-1]
    assert "rows 8/10 (0 failed, 8 resumed)" in last and "5.0 output tok/s" in last


def test_ctrl_c_keeps_rows_then_status_and_resume_say_so(capsys, monkeypatch, tmp_path):
    src = tmp_path / "docs.jsonl"
    shutil.copy(SAMPLE_JOBS / "docs_qa.jsonl", src)
    out = tmp_path / "docs.out.jsonl"
    finished = ConsoleObserver.row_finished

    def interrupt_at_the_fourth_row(self, result):
        finished(self, result)
        if self.done == 4:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ConsoleObserver, "row_finished", interrupt_at_the_fourth_row)
        code, stdout, err = run_cli(capsys, "run", src, "--max-tokens", "3", "--log-every", "0")
    assert code == 130, err
    message = flat(err)
    journal = tmp_path / ".docs.out.jsonl.journal.jsonl"
    assert f"error: interrupted; 4 finished row(s) are kept in {journal}" in message
    assert "run the same command again to resume" in message
    # What ran was said before generating, with the demo model called out.
    assert "using the bundled demo model" in message and "RANDOM weights" in message
    # dtype auto keeps the checkpoint's bfloat16 on CPUs with fast bf16, float32 elsewhere
    assert re.search(
        r"\(LlamaForCausalLM\) device=cpu dtype=(bfloat16|float32) attention=cpu sampling=greedy "
        r"max_tokens=3 kv=",
        message,
    )
    assert "dtype auto: the checkpoint" in message
    assert "attention auto: the in-place CPU kernel (supports the model)" in message

    code, stdout, err = run_cli(capsys, "status", out, "--json")
    status = json.loads(stdout)
    assert code == 5 and status["state"] == "interrupted" and status["rows_journaled"] == 4
    assert status["report"]["run"]["device"] == "cpu" and status["report"]["rows_journaled"] == 4
    code, stdout, err = run_cli(capsys, "status", out)
    assert code == 5 and "run the same command again to resume" in flat(stdout)

    code, stdout, err = run_cli(capsys, "run", src, "--max-tokens", "3")
    assert code == 0, err
    summary = flat(stdout)
    assert "12 (12 ok, 0 failed; 4 resumed from an earlier run's journal)" in summary
    code, stdout, _ = run_cli(capsys, "status", out, "--json")
    report = json.loads(stdout)["report"]
    generated, total = report["generated_output_tokens"], report["output_tokens"]
    assert code == 0 and 0 < generated < total  # (the sample rows set their own max_tokens)
    assert f"{generated} generated now" in summary and f"{total - generated} resumed" in summary
    assert report["output_tokens_per_s"] == generated / report["seconds"]["generate"]


def test_the_summary_counts_errors_past_the_listed_ones_and_names_the_file(capsys, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\n' + '{"prompt": "x", "max_tokens": -1}\n' * 7)
    code, stdout, err = run_cli(capsys, "run", src, "--max-tokens", "2")
    assert code == 3, err
    summary = flat(stdout)
    assert "... and 2 more" in summary
    assert f"{tmp_path}/.in.out.jsonl.errors.jsonl (every failed row)" in summary
