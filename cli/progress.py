"""Progress for a running job: a rich bar on a terminal; otherwise (cron) one plain line, or
one JSON object with ``--log-json``, per phase and every ``--log-every`` seconds.

Every progress report carries the same facts: rows done / total (and failed), output
tokens/s, ETA, the prompt-token saving so far, and KV blocks in use.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from batchrun.core.job.config import JobObserver
from batchrun.core.job.rows import RowResult

if TYPE_CHECKING:
    from batchrun.core.engine.engine import Engine


class ConsoleObserver(JobObserver):
    """Renders job progress on ``console`` (stderr); call ``close`` when the job ends."""

    def __init__(self, console: Console, log_every: float = 30.0, json_lines: bool = False) -> None:
        self.console = console
        self.log_every = log_every
        self.json_lines = json_lines
        self.interactive = console.is_terminal and not json_lines
        self.progress: Progress | None = None
        self.task = None
        self.engine: Engine | None = None
        self.total = self.done = self.failed = self.output_tokens = 0
        self.start = self.last_log = time.monotonic()

    def phase(self, name: str) -> None:
        if self.interactive:
            self.console.log(f"{name} ...")
        else:
            self._emit({"event": "phase", "phase": name}, name)

    def started(self, total_rows: int) -> None:
        self.total = total_rows
        self.start = self.last_log = time.monotonic()
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]generating"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "rows · {task.fields[rate]} tok/s · saving {task.fields[saving]} · KV {task.fields[kv]}"
                ),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("rows", total=total_rows, rate="0", saving="-", kv="-")

    def engine_started(self, engine: Engine) -> None:
        self.engine = engine

    def row_finished(self, result: RowResult) -> None:
        self.done += 1
        self.failed += result.finish_reason == "error"
        self.output_tokens += result.output_tokens
        facts = self.facts()
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=self.done,
                rate=f"{facts['output_tokens_per_s']:.0f}",
                saving=f"{facts['saving']:.0%}",
                kv=f"{facts['kv_blocks_used']}/{facts['kv_blocks']}",
            )
        elif time.monotonic() - self.last_log >= self.log_every or self.done == self.total:
            self.last_log = time.monotonic()
            eta = facts["eta_s"]
            self._emit(
                {"event": "progress", **facts},
                f"rows {self.done}/{self.total} ({self.failed} failed), "
                f"{facts['output_tokens_per_s']:.1f} output tok/s, "
                f"ETA {'-' if eta is None else f'{eta:.0f}s'}, saving {facts['saving']:.1%}, "
                f"KV {facts['kv_blocks_used']}/{facts['kv_blocks']} blocks",
            )

    def facts(self) -> dict:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        remaining = self.total - self.done
        engine = self.engine
        return {
            "rows_done": self.done,
            "rows_total": self.total,
            "rows_failed": self.failed,
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": self.output_tokens / elapsed,
            "eta_s": remaining * elapsed / self.done if self.done else None,
            "saving": engine.stats.live_saving if engine else 0.0,
            "kv_blocks_used": engine.pool.num_used if engine else 0,
            "kv_blocks": engine.pool.num_blocks if engine else 0,
        }

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _emit(self, event: dict, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        if self.json_lines:
            print(json.dumps({"time": stamp, **event}), file=self.console.file, flush=True)
        else:
            self.console.print(f"{stamp} batchrun: {text}", highlight=False, soft_wrap=True)
