"""What a run leaves beside its output for the people and scripts that check on it.

* ``.<output>.report.json`` — written when generation starts (``state: running``) and
  rewritten at the end (``done`` or ``failed``): timings per phase, rows ok / failed /
  resumed, tokens, throughput, saving, peak KV, versions, device, model identity, plan.
* ``.<output>.errors.jsonl`` — one line per failed row (``index``, ``id``, ``error``);
  removed when a run has no failed row, so a stale one never misleads.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from batchrun.core.job.config import JobSummary, RunInfo
from batchrun.core.job.io.atomic import atomic_file
from batchrun.core.job.rows import Row, RowResult
from batchrun.core.job.side_files import ERRORS, REPORT, side_file
from batchrun.core.planner.plan import PlanSummary


def report_path(output: Path) -> Path:
    return side_file(output, REPORT)


def errors_path(output: Path) -> Path:
    return side_file(output, ERRORS)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("batchrun", "torch", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


class RunReport:
    def __init__(self, output: Path | None, input: Path, model: Path) -> None:
        self.path = report_path(output) if output is not None else None  # None: keep no file
        self.device = "unknown"
        self.data: dict[str, Any] = {
            "state": "starting",
            "input": str(input),
            "output": str(output),
            "model": str(model),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
        }

    def started(self, rows: int, resumed: int, plan: PlanSummary, identity: str) -> None:
        self.data |= {
            "state": "running",
            "rows": rows,
            "resumed": resumed,
            "model_identity": identity,
            "plan": plan.to_dict(),
        }
        self._write()

    def run_info(self, info: RunInfo) -> None:
        self.data["run"] = asdict(info)
        self._write()

    def workers(self, workers: list[dict]) -> None:
        """Scaled out: each worker's rows, tokens/s and assigned cost so far (``batchrun status``
        shows them while the job runs)."""
        self.data["workers"] = workers
        self._write()

    def failed(
        self, error: str, seconds: dict[str, float], journaled: int = 0, state: str = "failed"
    ) -> None:
        """The run stopped early: ``state`` is "failed" or "interrupted"; ``journaled`` rows are
        kept for the next run."""
        self.data |= {
            "state": state,
            "error": error,
            "seconds": seconds,
            "device": self.device,
            "rows_journaled": journaled,
        }
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._write()

    def finished(self, summary: JobSummary) -> None:
        generate_s = summary.seconds.get("generate", 0.0)
        self.data |= {
            "state": "done",
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": self.device,
            "rows": summary.rows,
            "rows_ok": summary.ok,
            "rows_failed": summary.failed,
            "resumed": summary.resumed,
            "prompt_tokens": summary.prompt_tokens,
            "output_tokens": summary.output_tokens,
            "generated_output_tokens": summary.generated_output_tokens,
            # this run's throughput: rows resumed from an earlier run are not counted
            "output_tokens_per_s": summary.generated_output_tokens / generate_s if generate_s else 0.0,
            "seconds": summary.seconds,
            "engine": summary.engine.to_dict() if summary.engine else None,
            "plan": asdict(summary.plan) | {"saving": summary.plan.saving},
            "errors": summary.errors,
        }
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2))


def write_errors(output: Path, rows: list[Row], results: list[RowResult]) -> None:
    path = errors_path(output)
    failed = [(row, result) for row, result in zip(rows, results, strict=True) if result.error]
    if not failed:
        path.unlink(missing_ok=True)
        return
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row, result in failed:
            entry = {"index": row.index, "id": row.id, "location": row.location, "error": result.error}
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
