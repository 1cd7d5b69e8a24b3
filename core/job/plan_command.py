"""``batchrun plan``: plan a job without running it, and say what the plan would save.

Needs the model's tokenizer and config only (no weights), so it runs in seconds on a
laptop before GPU hours are spent. The report compares three costs of the same batch, in
prompt tokens computed: no sharing at all; an LRU prefix cache of the same KV budget fed
in file order (lru_baseline.py, an upper bound for vLLM/SGLang automatic prefix caching);
and batchrun's plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchrun.core.checkpoint import open_checkpoint
from batchrun.core.job.config import JobObserver
from batchrun.core.job.io import STDIO, open_source
from batchrun.core.job.planning import expected_output_tokens, runnable_mask
from batchrun.core.job.prepare import job_defaults, read_and_tokenize
from batchrun.core.job.rows import Columns
from batchrun.core.job.token_cache import TokenCache
from batchrun.core.planner.lru_baseline import lru_estimate
from batchrun.core.planner.plan import Plan, PlanSummary, build_plan
from batchrun.core.runner.kv_budget import kv_cache_bytes
from batchrun.core.runner.kv_cache import KVCacheSpec
from batchrun.core.runner.model_loader import resolve_device, resolve_dtype
from batchrun.core.timing import PhaseTimer

PREVIEW_CHARS = 60
LISTED_ROWS = 5


@dataclass(frozen=True)
class SegmentView:
    id: int
    parent: int  # -1 at the top
    depth: int
    start: int
    end: int
    users: int
    saved_tokens: int  # (users - 1) * tokens: what computing it once saves
    preview: str  # the segment's own text, shortened

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class GroupView:
    segment: int  # the segment heading the first-level group
    prefix_tokens: int
    rows: int


@dataclass(frozen=True)
class SplitView:
    """How ``--workers N`` would cut the job (core/distributed/split.py)."""

    workers: int
    units: int
    split_groups: int  # shared segments whose rows go to more than one unit
    computed_tokens: int  # prompt tokens computed over all units (>= the plan's)
    worker_costs: list[int]  # each worker's estimated tokens, pulling units longest first
    largest_units: list[int]  # the costs of the largest units

    @property
    def balance(self) -> float:
        """Mean over largest worker load: 1.0 is perfect, 0.5 means one worker does twice the mean."""
        top = max(self.worker_costs, default=0)
        return sum(self.worker_costs) / len(self.worker_costs) / top if top else 1.0


@dataclass
class PlanReport:
    input: Path
    model: str
    summary: PlanSummary
    lru_computed_tokens: int
    lru_simulated_rows: int  # runnable rows the LRU simulation ran; the rest is extrapolated
    kv_bytes_per_token: int
    kv_budget_bytes: int
    max_context: int
    over_context_rows: list[str]  # messages of rows whose prompt + max_tokens exceed the context
    over_context_count: int
    invalid_rows: int  # other rows that cannot run (bad fields, tokenizer failures)
    top_segments: list[SegmentView]
    top_groups: list[GroupView]
    seconds: dict[str, float] = field(default_factory=dict)
    split: SplitView | None = None  # with --workers

    @property
    def all_resident_kv_bytes(self) -> int:
        """KV for every row at once with the plan's sharing, prompts plus expected outputs: the
        most the job could use; the engine never exceeds the budget (it admits rows in turn)."""
        s = self.summary
        return (s.computed_tokens + s.expected_output_tokens) * self.kv_bytes_per_token

    def to_json(self) -> dict[str, Any]:
        s = self.summary
        return {
            "input": str(self.input),
            "model": self.model,
            "rows": s.rows,
            "runnable_rows": s.runnable_rows,
            "prompt_tokens": s.prompt_tokens,
            "computed_tokens": s.computed_tokens,
            "saving": s.saving,
            "no_sharing_computed_tokens": s.prompt_tokens,
            "lru_computed_tokens": self.lru_computed_tokens,
            "lru_saving": 1 - self.lru_computed_tokens / s.prompt_tokens if s.prompt_tokens else 0.0,
            "lru_simulated_rows": self.lru_simulated_rows,
            "shared_segments": s.shared_segments,
            "shared_segment_tokens": s.shared_segment_tokens,
            "groups": s.groups,
            "block_size": s.block_size,
            "expected_output_tokens": s.expected_output_tokens,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_budget_bytes": self.kv_budget_bytes,
            "all_resident_kv_bytes": self.all_resident_kv_bytes,
            "max_context": self.max_context,
            "over_context_rows": self.over_context_count,
            "invalid_rows": self.invalid_rows,
            "segments": [asdict(seg) | {"tokens": seg.tokens} for seg in self.top_segments],
            "groups_top": [asdict(group) for group in self.top_groups],
            "seconds": self.seconds,
            "workers": asdict(self.split) | {"balance": self.split.balance} if self.split else None,
        }


def plan_job(
    input: Path,
    model: Path,
    *,
    columns: Columns = Columns(),
    sampling: dict[str, Any] | None = None,
    block_size: int = 16,
    kv_memory: int | float | None = None,
    top: int = 10,
    device: str = "auto",
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    limit: int | None = None,
    observer: JobObserver | None = None,
    workers: int | None = None,
) -> tuple[PlanReport, Plan]:
    """Read, tokenize and plan ``input`` for ``model``; ``InputError`` if either is unusable."""
    timer = PhaseTimer()
    lap, seconds = timer.lap, timer.seconds
    checkpoint = open_checkpoint(
        model, need_weights=False, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs
    )
    source = open_source(input, columns, limit)
    # rows are tokenized as they are read; the ids stay beside the default output, where a
    # following `batchrun run` finds them
    cache = TokenCache.beside(source.default_output(), source, checkpoint) if input != STDIO else None
    progress = observer.tokenized if observer else None
    read = read_and_tokenize(
        source,
        job_defaults(checkpoint, sampling or {}, source),
        checkpoint,
        caches=[cache],
        progress=progress,
    )
    rows, (tokenizer, prompts, max_context, overflowing) = read.rows, read.tokenized
    lap("read")
    seconds["read"] -= read.tokenize_s
    seconds["tokenize"] = read.tokenize_s
    over_context = [rows[i].error for i in overflowing]

    runnable = runnable_mask(rows)
    plan = build_plan(prompts, runnable, expected_output_tokens(rows), block_size)
    lap("plan")

    torch_device = resolve_device(device)
    dtype = resolve_dtype("auto", torch_device, getattr(checkpoint.text_config, "dtype", None))
    spec = KVCacheSpec.from_config(checkpoint.config, dtype, block_size)
    budget = kv_budget(model, torch_device, kv_memory)
    lru, simulated = lru_estimate(plan.tree, prompts.lengths, runnable, budget // spec.bytes_per_block)
    lap("lru baseline")

    report = PlanReport(
        input=input,
        model=model.name,
        summary=plan.summary,
        lru_computed_tokens=lru,
        lru_simulated_rows=simulated,
        kv_bytes_per_token=spec.bytes_per_token,
        kv_budget_bytes=budget,
        max_context=max_context,
        over_context_rows=over_context[:LISTED_ROWS],
        over_context_count=len(over_context),
        invalid_rows=int((~runnable).sum()) - len(overflowing),
        top_segments=top_segments(plan, prompts, tokenizer, top),
        top_groups=top_groups(plan, top),
        seconds=seconds,
        split=split_view(plan, prompts, rows, workers) if workers else None,
    )
    return report, plan


def split_view(plan: Plan, prompts, rows, workers: int, top: int = 5) -> SplitView:
    from batchrun.core.distributed.driver import row_decode_tokens
    from batchrun.core.distributed.split import split_plan

    split = split_plan(plan, prompts.lengths, row_decode_tokens(rows), workers)
    return SplitView(
        workers=workers,
        units=len(split.units),
        split_groups=len(split.split_segments),
        computed_tokens=split.computed_tokens,
        worker_costs=split.balance(),
        largest_units=[u.cost for u in split.units[:top]],
    )


def kv_budget(model: Path, device: torch.device, kv_memory: int | float | None) -> int:
    """The KV budget ``batchrun run`` would get; on a GPU the weights come out of free memory."""
    budget = kv_cache_bytes(device, kv_memory)
    if device.type == "cuda" and not isinstance(kv_memory, int):
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        budget = max(budget - weights, 0)
    return budget


def top_segments(plan: Plan, prompts, tokenizer, top: int) -> list[SegmentView]:
    tree = plan.tree
    saved = (tree.users - 1) * tree.lengths
    best = np.lexsort((np.arange(len(tree)), -saved))[:top]
    views = []
    for s in sorted(best.tolist()):  # ids ascending: parents before children
        row_tokens = prompts[int(tree.first_row[s])]
        text = tokenizer.decode(row_tokens[tree.start[s] : tree.end[s]].tolist())
        views.append(
            SegmentView(
                id=s,
                parent=int(tree.parent[s]),
                depth=int(tree.depth[s]),
                start=int(tree.start[s]),
                end=int(tree.end[s]),
                users=int(tree.users[s]),
                saved_tokens=int(saved[s]),
                preview=shorten(text),
            )
        )
    return views


def top_groups(plan: Plan, top: int) -> list[GroupView]:
    group = plan.row_group()
    heads, counts = np.unique(group[group >= 0], return_counts=True)
    best = np.lexsort((heads, -counts))[:top]
    return [GroupView(int(heads[i]), int(plan.tree.end[heads[i]]), int(counts[i])) for i in best.tolist()]


def shorten(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"
