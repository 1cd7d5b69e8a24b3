"""``batchrun validate``: check a prompt file (and optionally token lengths) without running."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from batchrun.core.checkpoint import open_checkpoint
from batchrun.core.job.io import open_source
from batchrun.core.job.prepare import job_defaults, read_rows, tokenize_for
from batchrun.core.job.rows import Columns
from batchrun.core.params import SamplingParams


@dataclass
class ValidationReport:
    path: Path
    format_name: str
    rows: int
    problems: list[str] = field(default_factory=list)  # one per invalid row
    token_lengths: list[int] = field(default_factory=list)  # prompt tokens of the valid rows
    max_context: int | None = None


def validate_file(
    path: Path,
    columns: Columns = Columns(),
    model: Path | None = None,
    sampling: dict | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    limit: int | None = None,
) -> ValidationReport:
    """Read and check every row; with ``model``, also tokenize and check context lengths.

    File-level problems raise ``InputError`` exactly as ``batchrun run`` would."""
    checkpoint = (
        open_checkpoint(
            model, need_weights=False, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs
        )
        if model is not None
        else None
    )
    source = open_source(path, columns, limit)
    if checkpoint is not None:
        defaults = job_defaults(checkpoint, sampling or {}, source)
    else:
        defaults = SamplingParams().with_overrides(source.base_defaults | (sampling or {}))
    rows = read_rows(source, defaults)
    report = ValidationReport(path, source.format_name, len(rows))
    if checkpoint is not None:
        _, prompts, report.max_context, _ = tokenize_for(checkpoint, rows)
        lengths = prompts.lengths.tolist()
        report.token_lengths = [n for row, n in zip(rows, lengths, strict=True) if not row.error]
    report.problems = [row.error for row in rows if row.error]
    return report
