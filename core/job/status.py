"""``batchrun status OUTPUT``: what a job is doing, from the files it keeps beside its output."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchrun.core.job.journal import journal_path
from batchrun.core.job.lock import holder, is_locked
from batchrun.core.job.report import errors_path, report_path

# ``batchrun status`` exits with the state's code, for monitoring scripts.
STATE_EXIT_CODES = {
    "done": 0,  # finished; the output holds every row (failed rows included, see the report)
    "failed": 4,  # stopped by an error; the journal keeps its finished rows: run again to resume
    "interrupted": 5,  # killed or Ctrl-C; the journal keeps its finished rows: run again to resume
    "running": 6,  # a live process holds the output's lock
    "not started": 7,  # no report, no journal, no output
    "no report": 8,  # an output or journal but no report (removed, or from an older batchrun)
}


@dataclass
class JobStatus:
    output: Path
    state: str  # one of STATE_EXIT_CODES
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


def status_json(status: JobStatus) -> dict[str, Any]:
    return {
        "output": str(status.output),
        "state": status.state,
        "exit_code": STATE_EXIT_CODES[status.state],
        "rows": status.rows,
        "rows_journaled": status.rows_journaled,
        "rows_resumed": status.report.get("resumed", 0),
        "holder": status.holder,
        "errors_file": str(status.errors_file) if status.errors_file else None,
        "report": status.report,
    }
