"""Tables the CLI prints at the end of a command."""

from __future__ import annotations

import statistics

from rich.table import Table

from batchrun.core.job import JobSummary
from batchrun.core.validate import ValidationReport


def summary_table(summary: JobSummary) -> Table:
    table = Table(title="batchrun run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    generate_s = summary.seconds.get("generate", 0.0)
    table.add_row("input", str(summary.input))
    table.add_row("output", str(summary.output))
    table.add_row("rows", f"{summary.rows} ({summary.ok} ok, {summary.failed} failed)")
    table.add_row("prompt tokens", str(summary.prompt_tokens))
    table.add_row(
        "output tokens",
        f"{summary.output_tokens} ({summary.output_tokens / max(generate_s, 1e-9):.1f} tok/s)",
    )
    if summary.engine is not None:
        stats = summary.engine
        table.add_row(
            "engine",
            f"{stats.steps} steps, {stats.mean_tokens_per_step:.1f} tokens/step, "
            f"peak KV {stats.peak_blocks}/{stats.num_blocks} blocks",
        )
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in summary.seconds.items()))
    for error in summary.errors:
        table.add_row("[red]error", error)
    return table


def validation_table(report: ValidationReport) -> Table:
    table = Table(title=f"batchrun validate: {report.path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("format", report.format_name)
    table.add_row("rows", f"{report.rows} ({report.rows - len(report.problems)} valid)")
    if report.token_lengths:
        lengths = report.token_lengths
        table.add_row(
            "prompt tokens",
            f"total {sum(lengths)}, min {min(lengths)}, mean {statistics.fmean(lengths):.1f}, "
            f"max {max(lengths)} (model context {report.max_context})",
        )
    for problem in report.problems[:20]:
        table.add_row("[red]problem", problem)
    if len(report.problems) > 20:
        table.add_row("[red]problem", f"... and {len(report.problems) - 20} more")
    return table
