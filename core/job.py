"""A whole job: read ▸ tokenize ▸ resume ▸ plan ▸ load ▸ generate ▸ write, in row order.

Everything that can be checked without the model (file format, row fields, duplicate ids,
an output location we can write, another run holding the output) is checked before the
model loads, so a bad job fails in seconds, not after minutes of loading. Finished rows go
to the journal as they complete; rows an earlier run journaled are not generated again.
The core never prints: it reports to a ``JobObserver`` and returns a ``JobSummary``; the
CLI renders both.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from transformers import PreTrainedTokenizerBase

from batchrun.core.config import EngineConfig
from batchrun.core.engine import Completion, Engine, EngineStats, build_engine
from batchrun.core.io import OutputContext, PromptSource, open_source
from batchrun.core.io.atomic import remove_stale_temporaries
from batchrun.core.journal import Journal, journal_path, row_key
from batchrun.core.lock import OutputLocked, is_locked, locked_message, output_lock
from batchrun.core.model_loader import (
    LoadedModel,
    check_model_folder,
    load_model,
    load_tokenizer,
    max_context_of,
    model_identity,
    model_sampling_defaults,
)
from batchrun.core.params import SamplingParams
from batchrun.core.plan import ORDER_PLAN, Plan, PlanSummary, build_plan
from batchrun.core.plan_io import load_plan
from batchrun.core.prompt_tokens import PromptTokens
from batchrun.core.report import RunReport, write_errors
from batchrun.core.request import Request, SegmentRef
from batchrun.core.rows import Columns, InputError, OutputShape, Row, RowResult, parse_row
from batchrun.core.sampler import make_generator, row_seed
from batchrun.core.timing import PhaseTimer
from batchrun.core.tokenize import tokenize_rows

MAX_LISTED_PROBLEMS = 5


@dataclass(frozen=True)
class JobConfig:
    input: Path
    model: Path
    output: Path | None = None  # None: <input stem>.out.<ext> beside the input
    in_place: bool = False
    columns: Columns = Columns()
    sampling: dict[str, Any] = field(default_factory=dict)  # job-wide overrides set by the user
    seed: int = 0  # job seed: rows without their own seed derive one from it and their id
    device: str = "auto"
    dtype: str = "auto"
    engine: EngineConfig = EngineConfig()
    strict: bool = False  # refuse the whole file if any row is invalid
    plan_file: Path | None = None  # a plan saved by `batchrun plan --save` (checked against the input)
    prefix_sharing: bool = True  # False: compute every prompt in full (for comparison)
    restart: bool = False  # discard the journal of an earlier, unfinished run
    order: str = ORDER_PLAN  # or ORDER_INPUT: file order (for comparison)


class JobObserver:
    """Receives progress; the default does nothing (the CLI subclasses it)."""

    def phase(self, name: str) -> None: ...

    def started(self, total_rows: int) -> None: ...

    def row_finished(self, result: RowResult) -> None: ...

    def engine_started(self, engine: Engine) -> None: ...


@dataclass
class JobSummary:
    input: Path
    output: Path
    rows: int
    failed: int
    resumed: int  # rows taken from the journal of an earlier run
    prompt_tokens: int
    output_tokens: int
    seconds: dict[str, float]  # per phase
    engine: EngineStats | None
    plan: PlanSummary
    errors: list[str]  # the first few row errors

    @property
    def ok(self) -> int:
        return self.rows - self.failed


def output_path(config: JobConfig, source: PromptSource) -> Path:
    if config.in_place:
        if config.output is not None:
            raise InputError("use either --in-place or --output, not both")
        return config.input
    return config.output or source.default_output()


def check_writable(output: Path) -> None:
    folder = output.parent
    if not folder.is_dir():
        raise InputError(f"output folder {folder} does not exist; create it or pass -o elsewhere")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder {folder} is not writable; pass -o to a writable place")


def read_rows(source: PromptSource, defaults: SamplingParams) -> list[Row]:
    """Parse every record into a ``Row``; file-level problems raise ``InputError``."""
    rows = [
        parse_row(index, location, fields, source.columns, defaults)
        for index, (location, fields) in enumerate(source.records())
    ]
    if not rows:
        raise InputError(f"{source.path}: no rows; the file is empty")
    check_unique_ids(source, rows)
    return rows


def check_unique_ids(source: PromptSource, rows: list[Row]) -> None:
    first_seen: dict[str, Row] = {}
    duplicates: list[str] = []
    for row in rows:
        if row.id in first_seen:
            duplicates.append(f"id {row.id!r} at {row.location} (first at {first_seen[row.id].location})")
        else:
            first_seen[row.id] = row
    if duplicates:
        shown = "; ".join(duplicates[:MAX_LISTED_PROBLEMS])
        more = (
            f" and {len(duplicates) - MAX_LISTED_PROBLEMS} more"
            if len(duplicates) > MAX_LISTED_PROBLEMS
            else ""
        )
        raise InputError(
            f"{source.path}: row ids must be unique ('{source.columns.id}' field): {shown}{more}"
        )


def check_context(rows: list[Row], prompts: PromptTokens, max_context: int) -> list[int]:
    """Mark rows whose prompt plus ``max_tokens`` cannot fit in the model's context; return
    their indices."""
    marked = []
    lengths = prompts.lengths.tolist()
    for row, length in zip(rows, lengths, strict=True):
        if row.error:
            continue
        if length + row.params.max_tokens > max_context:
            row.error = (
                f"{row.location}: prompt ({length} tokens) + max_tokens ({row.params.max_tokens}) "
                f"exceeds the model's context of {max_context} tokens; shorten the prompt or lower max_tokens"
            )
            marked.append(row.index)
    return marked


def job_defaults(model: Path, sampling: dict[str, Any]) -> SamplingParams:
    """Row defaults: the checkpoint's generation config, overridden by the job's options."""
    return SamplingParams().with_overrides(model_sampling_defaults(model) | sampling)


class TokenizedRows(NamedTuple):
    tokenizer: PreTrainedTokenizerBase
    prompts: PromptTokens
    max_context: int
    over_context: list[int]  # rows just marked for exceeding the context


def tokenize_for(model: Path, rows: list[Row]) -> TokenizedRows:
    """Tokenize ``rows`` with ``model``'s tokenizer and mark those that overflow its context
    (as ``run``, ``plan`` and ``validate`` all do)."""
    tokenizer = load_tokenizer(model)
    prompts = tokenize_rows(rows, tokenizer)
    max_context = max_context_of(model)
    return TokenizedRows(tokenizer, prompts, max_context, check_context(rows, prompts, max_context))


def runnable_mask(rows: list[Row]) -> np.ndarray:
    return np.fromiter((row.error is None for row in rows), dtype=bool, count=len(rows))


def expected_output_tokens(rows: list[Row]) -> np.ndarray:
    """Each row's output-length estimate for the plan: its hint, else its ``max_tokens``."""

    def estimate(row: Row) -> int:
        if row.error:
            return 0
        return row.expected_tokens if row.expected_tokens is not None else row.params.max_tokens

    return np.fromiter(map(estimate, rows), dtype=np.int64, count=len(rows))


def make_plan(config: JobConfig, rows: list[Row], prompts: PromptTokens, skip: Collection[int] = ()) -> Plan:
    """The job's plan: loaded from ``config.plan_file`` (checked against the input), or built.
    Rows in ``skip`` (resumed from the journal) are left out."""
    runnable = runnable_mask(rows)
    if config.plan_file is not None:
        plan = load_plan(config.plan_file, prompts, runnable, config.engine.block_size)
        return plan.without(set(skip))
    runnable[list(skip)] = False
    return build_plan(
        prompts,
        runnable,
        expected_output_tokens(rows),
        config.engine.block_size,
        sharing=config.prefix_sharing,
        order=config.order,
    )


def make_requests(
    rows: list[Row], prompts: PromptTokens, plan: Plan, job_seed: int, sample_sharing: bool = True
) -> Iterator[Request]:
    """The requests of the runnable rows in plan order: one per sample, each reading its
    plan segments; the ``n`` samples of a row also share its prompt as one more segment."""
    tree, block_size = plan.tree, plan.block_size
    paths: dict[int, tuple[SegmentRef, ...]] = {-1: ()}
    row_group = plan.row_group()
    for index in plan.order.tolist():
        row = rows[index]
        params = row.params
        deepest = int(tree.row_segment[index])
        if deepest not in paths:
            paths[deepest] = tuple(
                SegmentRef(s, int(tree.start[s]), int(tree.end[s])) for s in tree.path(deepest)
            )
        segments = paths[deepest]
        prompt = prompts[index]
        shared_end = segments[-1].end if segments else 0
        own_end = (len(prompt) - 1) // block_size * block_size  # full blocks before the last token
        group = int(row_group[index])
        prefix_group = (group, int(tree.end[group])) if group >= 0 else None
        if params.n > 1 and sample_sharing and own_end > shared_end:
            segments += (SegmentRef(len(tree) + index, shared_end, own_end),)
            prefix_group = (len(tree) + index, own_end)  # the samples share the whole prompt
        seed = effective_seed(row, job_seed)
        for k in range(params.n):
            sample_seed = seed if k == 0 else row_seed(seed, f"sample {k}")
            generator = None if params.greedy else make_generator(sample_seed)
            yield Request(
                row.index,
                prompt,
                params,
                generator,
                sample_index=k,
                segments=segments,
                expected_output=row.expected_tokens,
                prefix_group=prefix_group,
            )


def most_kv_tokens(requests: list[Request], block_size: int) -> int:
    """KV positions the job could ever hold at once: every shared segment once, plus each
    request's own part (prompt after its segments + max_tokens), with a block of rounding."""
    segments = {ref.key: ref.end - ref.start for r in requests for ref in r.segments}
    own = sum(r.max_total_tokens - (r.segments[-1].end if r.segments else 0) + block_size for r in requests)
    return own + sum(segments.values())


def output_shape(rows: list[Row]) -> OutputShape:
    runnable = [row.params for row in rows if row.params is not None]
    return OutputShape(
        samples=any(p.n > 1 for p in runnable), logprobs=any(p.logprobs is not None for p in runnable)
    )


def row_result(completions: list[Completion], prompt_tokens: int) -> RowResult:
    """One row's result from its samples' completions (one unless the row asked for n > 1)."""
    done = sorted(completions, key=lambda c: c.sample_index)
    failed = [c for c in done if c.finish_reason == "error"]
    if failed:
        return RowResult.failed(failed[0].error or "generation failed", prompt_tokens)
    cached = sum(c.cached_tokens for c in done)
    output_tokens = sum(len(c.token_ids) for c in done)
    if len(done) == 1:
        (c,) = done
        return RowResult(
            c.text, prompt_tokens, output_tokens, c.finish_reason, None, cached, c.token_ids, c.logprobs
        )
    reason = "length" if any(c.finish_reason == "length" for c in done) else "stop"
    logprobs = [c.logprobs for c in done] if done[0].logprobs is not None else None
    return RowResult(
        [c.text for c in done],
        prompt_tokens,
        output_tokens,
        reason,  # type: ignore[arg-type]
        None,
        cached,
        [c.token_ids for c in done],
        logprobs,
    )


def run_job(config: JobConfig, observer: JobObserver | None = None) -> JobSummary:
    """Run a whole job; one run per output at a time (``OutputLocked`` otherwise)."""
    observer = observer or JobObserver()
    started = time.perf_counter()
    observer.phase("reading")
    check_model_folder(config.model)
    source = open_source(config.input, config.columns)
    output = output_path(config, source)
    check_writable(output)
    if is_locked(output):  # fail fast, before reading a large file; the lock below decides
        raise OutputLocked(locked_message(output))
    # A bad file fails here, having written nothing.
    rows = read_rows(source, job_defaults(config.model, config.sampling))
    if config.strict:
        refuse_invalid_rows(source, rows)
    with output_lock(output):
        remove_stale_temporaries(output)
        return _run_locked(config, observer, source, output, rows, time.perf_counter() - started)


def _run_locked(
    config: JobConfig,
    observer: JobObserver,
    source: PromptSource,
    output: Path,
    rows: list[Row],
    read_s: float,
) -> JobSummary:
    timer = PhaseTimer({"read": read_s})
    lap, seconds = timer.lap, timer.seconds
    report = RunReport(output, config.input, config.model)

    observer.phase("tokenizing")
    tokenizer, prompts, _, _ = tokenize_for(config.model, rows)
    lap("tokenize")

    journal = Journal(journal_path(output))
    if config.restart:
        journal.discard()
    identity = model_identity(config.model)
    keys = {
        row.id: row_key(prompts[row.index], row.params, effective_seed(row, config.seed), identity)
        for row in rows
        if not row.error
    }
    resumed, ignored = journal.read(keys)
    if resumed or ignored:
        observer.phase(
            f"resuming: {len(resumed)} row(s) already done in {journal.path.name}"
            + (f" ({ignored} stale or damaged line(s) ignored)" if ignored else "")
        )

    observer.phase("planning")
    index_of = rows_by_id(rows)
    plan = make_plan(config, rows, prompts, skip=[index_of[row_id] for row_id in resumed])
    lap("plan")
    report.started(rows=len(rows), resumed=len(resumed), plan=plan.summary, identity=identity)

    try:
        loaded = None
        if len(plan.order):  # a run resumed with every row journaled needs no model
            observer.phase("loading model")
            loaded = load_model(config.model, config.device, config.dtype, tokenizer=tokenizer)
            report.device = str(loaded.device)
        lap("load")

        observer.phase("generating")
        observer.started(len(rows))
        results, stats = generate(config, loaded, rows, prompts, plan, observer, journal, keys, resumed)
        lap("generate")

        observer.phase("writing")
        context = OutputContext(config.model.name, int(time.time()), output_shape(rows))
        source.write(output, results, context)
        write_errors(output, rows, results)
        lap("write")
    except BaseException as exc:  # the journal keeps every finished row for the next run
        journal.close()
        report.failed(f"{type(exc).__name__}: {exc}", seconds)
        raise

    errors = [r.error for r in results if r.error]
    summary = JobSummary(
        input=config.input,
        output=output,
        rows=len(rows),
        failed=len(errors),
        resumed=len(resumed),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        output_tokens=sum(r.output_tokens for r in results),
        seconds=seconds,
        engine=stats,
        plan=plan.summary,
        errors=errors[:MAX_LISTED_PROBLEMS],
    )
    report.finished(summary)
    journal.discard()  # the output now holds every row; the report says the job is done
    return summary


def effective_seed(row: Row, job_seed: int) -> int:
    return row.params.seed if row.params.seed is not None else row_seed(job_seed, row.id)


def rows_by_id(rows: list[Row]) -> dict[str, int]:
    return {row.id: row.index for row in rows}


def generate(
    config: JobConfig,
    loaded: LoadedModel | None,
    rows: list[Row],
    prompts: PromptTokens,
    plan: Plan,
    observer: JobObserver,
    journal: Journal | None = None,
    keys: dict[str, str] | None = None,
    resumed: dict[str, RowResult] | None = None,
) -> tuple[list[RowResult], EngineStats | None]:
    """Run every planned row through the engine; invalid rows get their error record and
    journaled rows their journaled result. Each finished row is journaled at once."""
    results: list[RowResult | None] = [None] * len(rows)
    for row in rows:
        if row.error:
            results[row.index] = RowResult.failed(row.error)
        elif resumed and row.id in resumed:
            results[row.index] = resumed[row.id]
        else:
            continue
        observer.row_finished(results[row.index])
    requests = list(make_requests(rows, prompts, plan, config.seed, config.prefix_sharing))
    stats = None
    if requests:
        assert loaded is not None, "rows to generate but no model loaded"
        engine = build_engine(loaded, config.engine, useful_tokens=most_kv_tokens(requests, plan.block_size))
        observer.engine_started(engine)
        pending: dict[int, list[Completion]] = {}
        for completion in engine.generate(requests):
            index = completion.request_id
            samples = pending.setdefault(index, [])
            samples.append(completion)
            if len(samples) < rows[index].params.n:
                continue
            result = results[index] = row_result(pending.pop(index), len(prompts[index]))
            if journal is not None and keys is not None and result.error is None:
                journal.append(rows[index].id, keys[rows[index].id], result)
            observer.row_finished(result)
        stats = engine.stats
    if journal is not None:
        journal.sync()
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"engine finished without results for rows {missing[:MAX_LISTED_PROBLEMS]}")
    return results, stats  # type: ignore[return-value]


def refuse_invalid_rows(source: PromptSource, rows: list[Row]) -> None:
    bad = [row.error for row in rows if row.error]
    if bad:
        listed = "\n  ".join(bad[:MAX_LISTED_PROBLEMS])
        raise InputError(f"{source.path}: {len(bad)} invalid row(s) (--strict):\n  {listed}")
