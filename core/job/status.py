"""``batchrun status OUTPUT``: what a job is doing, from the files it keeps beside its output."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchrun.core.job.journal import journal_path
from batchrun.core.job.lock import holder, is_locked
from batchrun.core.job.report import errors_path, report_path


@dataclass
class JobStatus:
    output: Path
    state: str  # "running" | "interrupted" | "done" | "failed" | "not started" | "no report"
    rows: int | None = None
    rows_journaled: int = 0  # finished rows kept in the journal (an unfinished run's progress)
    report: dict[str, Any] = field(default_factory=dict)
    holder: dict | None = None  # the process holding the lock, while running
    errors_file: Path | None = None


def job_status(output: Path) -> JobStatus:
    report: dict[str, Any] = {}
    try:
        report = json.loads(report_path(output).read_text())
    except (OSError, json.JSONDecodeError):
        pass
    running = is_locked(output)
    state = report.get("state", "not started")
    if not report and (output.exists() or journal_path(output).exists()):
        state = "no report"  # written by a batchrun before reports, or its report was removed
    if running:
        state = "running"
    elif state in ("running", "starting"):
        state = "interrupted"  # the report says running but no process holds the lock
    journal = journal_path(output)
    journaled = 0
    if journal.exists():
        with open(journal, "rb") as f:
            journaled = sum(1 for line in f if line.endswith(b"\n"))
    errors = errors_path(output)
    return JobStatus(
        output=output,
        state=state,
        rows=report.get("rows"),
        rows_journaled=journaled,
        report=report,
        holder=holder(output) if running else None,
        errors_file=errors if errors.exists() else None,
    )
