"""Progress for a running job: a rich bar on a terminal, plain log lines otherwise (cron)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from batchrun.core.job import JobObserver
from batchrun.core.rows import RowResult


class ConsoleObserver(JobObserver):
    """Renders job progress on ``console`` (stderr); call ``close`` when the job ends."""

    def __init__(self, console: Console, log_every: float = 30.0) -> None:
        self.console = console
        self.log_every = log_every
        self.interactive = console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.total = self.done = self.failed = self.output_tokens = 0
        self.start = self.last_log = time.monotonic()

    def phase(self, name: str) -> None:
        if self.interactive:
            self.console.log(f"{name} ...")
        else:
            self._plain(name)

    def started(self, total_rows: int) -> None:
        self.total = total_rows
        self.start = self.last_log = time.monotonic()
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]generating"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows · {task.fields[rate]} tok/s"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("rows", total=total_rows, rate="0")

    def row_finished(self, result: RowResult) -> None:
        self.done += 1
        self.failed += result.finish_reason == "error"
        self.output_tokens += result.output_tokens
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done, rate=f"{self._rate():.0f}")
        elif time.monotonic() - self.last_log >= self.log_every:
            self.last_log = time.monotonic()
            self._plain(
                f"rows {self.done}/{self.total} ({self.failed} failed), "
                f"{self.output_tokens} output tokens, {self._rate():.1f} tok/s"
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _rate(self) -> float:
        return self.output_tokens / max(time.monotonic() - self.start, 1e-9)

    def _plain(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.console.print(f"{stamp} batchrun: {message}", highlight=False, soft_wrap=True)
