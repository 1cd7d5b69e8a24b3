"""Tables the CLI prints at the end of a command."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

if TYPE_CHECKING:  # plan and validate import torch; rendering needs only the types
    from batchrun.core.job.config import JobSummary
    from batchrun.core.job.plan_command import PlanReport
    from batchrun.core.job.status import JobStatus
    from batchrun.core.job.validate import ValidationReport


def summary_table(summary: JobSummary) -> Table:
    table = Table(title="batchrun run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    generate_s = summary.seconds.get("generate", 0.0)
    table.add_row("input", str(summary.input))
    table.add_row("output", str(summary.output))
    resumed = f"; {summary.resumed} resumed from an earlier run's journal" if summary.resumed else ""
    table.add_row("rows", f"{summary.rows} ({summary.ok} ok, {summary.failed} failed{resumed})")
    table.add_row("prompt tokens", str(summary.prompt_tokens))
    generated = summary.generated_output_tokens
    rate = f"{generated / max(generate_s, 1e-9):.1f} tok/s"
    if summary.resumed:
        table.add_row(
            "output tokens",
            f"{generated} generated now ({rate}), {summary.output_tokens - generated} resumed",
        )
    else:
        table.add_row("output tokens", f"{generated} ({rate})")
    plan = summary.plan
    table.add_row(
        "plan",
        f"{plan.computed_tokens:,} of {plan.prompt_tokens:,} prompt tokens to compute "
        f"(saving {plan.saving:.1%}), {plan.shared_segments} shared segments",
    )
    if summary.engine is not None:
        stats = summary.engine
        table.add_row(
            "prompt tokens computed",
            f"{stats.prefill_tokens:,} of {stats.prompt_tokens:,} (saving {stats.saving:.1%}, "
            f"{stats.cached_prompt_tokens:,} read from shared blocks)",
        )
        table.add_row(
            "engine",
            f"{stats.steps} steps, {stats.mean_tokens_per_step:.1f} tokens/step, "
            f"peak KV {stats.peak_blocks}/{stats.num_blocks} blocks, {stats.preemptions} preemptions; "
            f"prefill {stats.prefill_tokens_per_s:,.0f} tok/s, decode {stats.decode_tokens_per_s:,.0f} tok/s",
        )
        for name, line in worker_lines((stats.to_dict()).get("workers") or []):
            table.add_row(name, line)
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in summary.seconds.items()))
    for error in summary.errors:
        table.add_row("[red]error", escape(error))
    if summary.failed > len(summary.errors):
        table.add_row("[red]error", f"... and {summary.failed - len(summary.errors)} more")
    if summary.errors_file is not None:
        table.add_row("errors file", escape(f"{summary.errors_file} (every failed row)"))
    return table


def worker_lines(workers: list[dict]) -> list[tuple[str, str]]:
    """One line per scale-out worker (from ``WorkerStats.to_dict``): rows, tokens/s, assigned cost."""
    lines = []
    for w in workers:
        where = f"{w['device']} on {w['node'] or '?'}"
        if w["state"] == "not started":
            lines.append((f"[red]worker {w['name']}", escape(f"could not start: {w['error']}")))
            continue
        died = f"; [red]died[/]: {escape(str(w['error']))}" if w["state"] == "died" else ""
        lines.append(
            (
                f"worker {w['name']}",
                f"{where}: {w['rows']} rows in {w['units']} units, "
                f"{w['prefill_tokens'] + w['decode_tokens']:,} tokens ({w['tokens_per_s']:,.0f} tok/s busy), "
                f"assigned cost {w['assigned_cost']:,}, load {w['load_s']:.1f}s{died}",
            )
        )
    return lines


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
        table.add_row("[red]problem", escape(problem))
    if len(report.problems) > 20:
        table.add_row("[red]problem", f"... and {len(report.problems) - 20} more")
    return table


def plan_tables(report: PlanReport) -> list[Table | Tree]:
    """Summary, cost comparison, the top shared segments as a tree, and the largest groups."""
    s = report.summary
    summary = Table(title=f"batchrun plan: {report.input}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("model", report.model)
    summary.add_row("rows", f"{s.rows} ({s.runnable_rows} planned)")
    summary.add_row("prompt tokens", f"{s.prompt_tokens:,}")
    summary.add_row("tokens to compute", f"{s.computed_tokens:,} (saving {s.saving:.1%})")
    summary.add_row(
        "shared segments",
        f"{s.shared_segments:,} ({s.shared_segment_tokens:,} tokens), {s.groups:,} first-level groups",
    )
    summary.add_row("block size", str(s.block_size))
    summary.add_row(
        "KV memory",
        f"{report.kv_bytes_per_token:,} B/token; all rows at once {_bytes(report.all_resident_kv_bytes)}, "
        f"budget {_bytes(report.kv_budget_bytes)}",
    )
    if report.over_context_count:
        summary.add_row(
            "[red]over context",
            f"{report.over_context_count} row(s) exceed the model's context of {report.max_context} "
            "tokens and will get an error record",
        )
        for message in report.over_context_rows:
            summary.add_row("", message)
    if report.invalid_rows:
        summary.add_row("[red]invalid rows", f"{report.invalid_rows} (run `batchrun validate` for details)")

    costs = Table(title="what it would cost (prompt tokens computed)", title_justify="left")
    costs.add_column("strategy")
    costs.add_column("tokens computed", justify="right")
    costs.add_column("saving", justify="right")
    lru = "LRU prefix cache, file order (upper bound)"
    if report.lru_simulated_rows < s.runnable_rows:
        lru = f"LRU prefix cache, file order (first {report.lru_simulated_rows:,} rows, extrapolated)"
    for name, computed in (
        ("no prefix sharing", s.prompt_tokens),
        (lru, report.lru_computed_tokens),
        ("batchrun plan", s.computed_tokens),
    ):
        saving = 1 - computed / s.prompt_tokens if s.prompt_tokens else 0.0
        costs.add_row(name, f"{computed:,}", f"{saving:.1%}")

    tree = Tree(f"top {len(report.top_segments)} shared segments (by tokens saved)")
    nodes: dict[int, Tree] = {}
    for seg in report.top_segments:
        parent = nodes.get(seg.parent, tree)
        label = (
            f"[bold]#{seg.id}[/] {seg.tokens} tokens × {seg.users} rows, depth {seg.depth}, "
            f"saves {seg.saved_tokens:,}  [dim]{escape(seg.preview)!r}[/]"
        )
        nodes[seg.id] = parent.add(label)

    groups = Table(title="largest first-level groups", title_justify="left")
    groups.add_column("group (segment)")
    groups.add_column("shared prefix tokens", justify="right")
    groups.add_column("rows", justify="right")
    for group in report.top_groups:
        groups.add_row(f"#{group.segment}", str(group.prefix_tokens), str(group.rows))
    if report.split is None:
        return [summary, costs, tree, groups]
    return [summary, costs, tree, groups, split_table(report)]


def split_table(report: PlanReport) -> Table:
    """How --workers N would cut the job and how even the workers' loads would be."""
    split, s = report.split, report.summary
    table = Table(title=f"split over {split.workers} workers", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    extra = split.computed_tokens - s.computed_tokens
    table.add_row(
        "work units",
        f"{split.units} (queued largest first; {split.split_groups} prefix group(s) over a fair share split)",
    )
    table.add_row(
        "prompt tokens computed",
        f"{split.computed_tokens:,} (+{extra:,}, {extra / max(s.computed_tokens, 1):.1%} over one process)",
    )
    loads = ", ".join(f"{c:,}" for c in split.worker_costs)
    table.add_row("tokens per worker", f"{loads} (estimated, equal workers)")
    table.add_row("balance", f"{split.balance:.1%} (mean / largest worker)")
    table.add_row("largest units", ", ".join(f"{c:,}" for c in split.largest_units))
    return table


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def status_table(status: JobStatus) -> Table:
    table = Table(title=f"batchrun status: {status.output}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    report = status.report
    table.add_row("state", status.state)
    if status.holder:
        table.add_row("process", f"pid {status.holder.get('pid')} on {status.holder.get('host')}")
    if status.rows is not None:
        table.add_row("rows", str(status.rows))
    if status.state in ("running", "interrupted", "failed"):
        resumed = report.get("resumed", 0)
        table.add_row(
            "progress",
            f"{status.rows_journaled + resumed} rows finished and journaled"
            + (f" ({resumed} from an earlier run)" if resumed else ""),
        )
    if status.state in ("running", "interrupted", "failed"):
        for name, line in worker_lines(report.get("workers") or []):
            table.add_row(name, line)
    if status.state in ("interrupted", "failed"):
        table.add_row("next", "run the same command again to resume (finished rows are not regenerated)")
    if status.state == "done":
        table.add_row("result", f"{report.get('rows_ok')} ok, {report.get('rows_failed')} failed")
        engine = report.get("engine") or {}
        if engine:
            table.add_row("saving", f"{engine.get('saving', 0):.1%} of prompt tokens not computed")
        for name, line in worker_lines(engine.get("workers") or []):
            table.add_row(name, line)
    for key in ("started", "finished", "error", "model_identity", "device"):
        if report.get(key):
            table.add_row(key, str(report[key]))
    if status.errors_file:
        table.add_row("errors", str(status.errors_file))
    return table
