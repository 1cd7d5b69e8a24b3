"""A whole job: read ▸ tokenize ▸ resume ▸ plan ▸ load ▸ generate ▸ write, in row order.

Everything that can be checked without the model (file format, row fields, duplicate ids,
an output location we can write, another run holding the output) is checked before the
model loads, so a bad job fails in seconds, not after minutes of loading. Finished rows go
to the journal as they complete; rows an earlier run journaled are not generated again.
The core never prints: it reports to a ``JobObserver`` and returns a ``JobSummary``; the
CLI renders both.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from batchrun.core.checkpoint import Checkpoint, open_checkpoint
from batchrun.core.engine.engine import build_engine
from batchrun.core.engine.stats import Completion, EngineInfo, EngineStats
from batchrun.core.errors import InputError
from batchrun.core.job.config import (
    BUNDLED_MODEL,
    MAX_LISTED_PROBLEMS,
    JobConfig,
    JobObserver,
    JobSummary,
    RunInfo,
    StepStats,
)
from batchrun.core.job.io import STDIO, OutputContext, PromptSource, open_source
from batchrun.core.job.io.atomic import remove_stale_temporaries
from batchrun.core.job.io.convert import Writer
from batchrun.core.job.journal import Journal, Journaled, journal_path, row_key
from batchrun.core.job.lock import OutputLocked, is_locked, locked_message, output_lock
from batchrun.core.job.prepare import (
    ReadRows,
    check_writable,
    effective_seed,
    job_defaults,
    job_output,
    make_plan,
    read_and_tokenize,
    refuse_invalid_rows,
    rows_by_id,
)
from batchrun.core.job.report import RunReport, errors_path, write_errors
from batchrun.core.job.requests import make_requests, most_kv_tokens
from batchrun.core.job.results import StoredResults, output_shape, row_result
from batchrun.core.job.rows import Row, RowResult
from batchrun.core.job.token_cache import TokenCache, cache_path
from batchrun.core.planner.plan import Plan
from batchrun.core.planner.prompt_tokens import PromptTokens
from batchrun.core.runner.model_loader import LoadedModel, load_model
from batchrun.core.timing import PhaseTimer


def run_job(config: JobConfig, observer: JobObserver | None = None) -> JobSummary:
    """Run a whole job; one run per output at a time (``OutputLocked`` otherwise)."""
    observer = observer or JobObserver()
    started = time.perf_counter()
    observer.phase("reading")
    checkpoint = open_checkpoint(
        config.model, chat_template=config.chat_template, chat_template_kwargs=config.chat_template_kwargs
    )
    if checkpoint.sampling_defaults:
        defaults = " ".join(f"{k}={v}" for k, v in checkpoint.sampling_defaults.items())
        observer.phase(f"sampling defaults from {checkpoint.name}/generation_config.json: {defaults}")
    source = open_source(config.input, config.columns, config.limit)
    output, write = job_output(config, source)
    check_writable(output)
    if output != STDIO and is_locked(output):  # fail fast, before reading a large file
        raise OutputLocked(locked_message(output))
    # A bad file fails here, having written nothing. Rows are tokenized as they are read (or
    # their ids memory-mapped from the token cache), their prompt text dropped.
    caches = token_caches(output, source, checkpoint) if output != STDIO and config.input != STDIO else []
    read = read_and_tokenize(
        source,
        job_defaults(checkpoint, config.sampling, source),
        checkpoint,
        caches=caches,
        progress=observer.tokenized,
    )
    if read.cache is not None:
        observer.phase(f"token ids reused from {read.cache.path}")
    if config.strict:  # rows over the context or failing the chat template count too
        try:
            refuse_invalid_rows(source, read.rows)
        except InputError:  # a refused file leaves nothing behind, not even its ids
            if read.cache is None and caches:
                caches[0].remove()
            raise
    seconds = {"read": time.perf_counter() - started - read.tokenize_s, "tokenize": read.tokenize_s}
    if output == STDIO:  # no side files: nothing to lock, resume or report beside stdout
        return _run_locked(config, observer, checkpoint, source, output, write, read, caches, seconds)
    with output_lock(output):
        remove_stale_temporaries(output)
        return _run_locked(config, observer, checkpoint, source, output, write, read, caches, seconds)


def _run_locked(
    config: JobConfig,
    observer: JobObserver,
    checkpoint: Checkpoint,
    source: PromptSource,
    output: Path,
    write: Writer,
    read: ReadRows,
    caches: list[TokenCache],
    read_seconds: dict[str, float],
) -> JobSummary:
    timer = PhaseTimer(read_seconds)
    lap, seconds = timer.lap, timer.seconds
    side_files = output != STDIO
    report = RunReport(output if side_files else None, config.input, config.model)
    rows, prompts = read.rows, read.tokenized.prompts

    journal = Journal(journal_path(output) if side_files else None)
    if config.restart:
        journal.discard()
    identity = checkpoint.identity
    keys = {
        row.id: row_key(prompts[row.index], row.params, effective_seed(row, config.seed), identity)
        for row in rows
        if not row.error
    }
    resumed, ignored = journal.index(keys)
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
            loaded = load_model(checkpoint, config.device, config.dtype)
            report.device = str(loaded.device)
        lap("load")

        observer.phase("generating")
        observer.started(len(rows), plan.summary.computed_tokens, plan.summary.expected_output_tokens)
        results, stats = generate(
            config, checkpoint, loaded, rows, prompts, plan, observer, journal, keys, resumed, report
        )
        lap("generate")

        observer.phase("writing")
        context = OutputContext(config.model.name, int(time.time()), output_shape(rows))
        write(results, context)  # streams the input and the journal in row order
        if side_files:
            write_errors(output, [rows[i] for i in results.failed()], [results[i] for i in results.failed()])
        results.close()
        lap("write")
    except BaseException as exc:  # the journal keeps every finished row for the next run
        journal.close()
        journaled = len(resumed) + journal.appended
        interrupted = isinstance(exc, KeyboardInterrupt)
        reason = "interrupted (Ctrl-C / SIGINT)" if interrupted else f"{type(exc).__name__}: {exc}"
        report.failed(reason, seconds, journaled, state="interrupted" if interrupted else "failed")
        observer.stopped(journaled, journal.path if journaled else None)
        raise

    failed = results.failed()
    errors = [results[i].error for i in failed[:MAX_LISTED_PROBLEMS]]
    resumed_tokens = sum(entry.output_tokens for entry in resumed.values())
    output_tokens = int(results.output_tokens.sum())
    summary = JobSummary(
        input=config.input,
        output=output,
        rows=len(rows),
        failed=len(failed),
        resumed=len(resumed),
        prompt_tokens=int(results.prompt_tokens.sum()),
        output_tokens=output_tokens,
        generated_output_tokens=output_tokens - resumed_tokens,
        seconds=seconds,
        engine=stats,
        plan=plan.summary,
        errors=errors,
        errors_file=errors_path(output) if failed and side_files else None,
    )
    report.finished(summary)
    journal.discard()  # the output now holds every row; the report says the job is done
    for cache in caches:
        if cache.hit or cache.path == cache_path(output):
            cache.remove()
    return summary


def token_caches(output: Path, source: PromptSource, checkpoint: Checkpoint) -> list[TokenCache]:
    """Where ``run`` looks for the prompts' ids: beside its output (a resumed run's), then
    beside the default output, where ``batchrun plan`` leaves them. New ids go beside the
    output."""
    caches = [TokenCache.beside(output, source, checkpoint)]
    default = source.default_output()
    if default != output:
        caches.append(TokenCache(cache_path(default), caches[0].key))
    return caches


def generate(
    config: JobConfig,
    checkpoint: Checkpoint,
    loaded: LoadedModel | None,
    rows: list[Row],
    prompts: PromptTokens,
    plan: Plan,
    observer: JobObserver,
    journal: Journal | None = None,
    keys: dict[str, str] | None = None,
    resumed: dict[str, Journaled] | None = None,
    report: RunReport | None = None,
) -> tuple[StoredResults, EngineStats | None]:
    """Run every planned row through the engine; invalid rows get their error record and
    journaled rows their journaled result. Each finished row is journaled at once and read
    back from the journal when the output is written, so results are not all held here."""
    journal = journal or Journal(None)
    results = StoredResults(len(rows), journal.path)
    for row in rows:
        if row.error:
            results.keep(row.index, RowResult.failed(row.error))
            observer.row_finished(results[row.index])
        elif resumed and row.id in resumed:
            results.journaled(row.index, *resumed[row.id])
    if resumed:
        observer.rows_resumed(len(resumed))
    requests = list(make_requests(rows, prompts, plan, config.seed, config.prefix_sharing))
    stats = None
    if requests:
        assert loaded is not None, "rows to generate but no model loaded"
        engine = build_engine(loaded, config.engine, useful_tokens=most_kv_tokens(requests, plan.block_size))
        capacity = engine.info.num_blocks * engine.info.block_size
        if fitted := fit_to_kv(rows, prompts, capacity):
            observer.phase(
                f"{fitted} row(s) without their own max_tokens are capped at what the KV cache "
                f"holds ({capacity} tokens with the prompt) instead of the model's context"
            )
            requests = list(make_requests(rows, prompts, plan, config.seed, config.prefix_sharing))
        observer.engine_started(engine.info)
        info = run_info(config, checkpoint, engine.info, loaded.dtype_choice)
        observer.run_info(info)
        if report is not None:
            report.run_info(info)
        pending: dict[int, list[Completion]] = {}
        on_step = lambda stats: observer.step(step_stats(stats))  # noqa: E731
        for completion in engine.generate(requests, on_step=on_step):
            index = completion.row
            samples = pending.setdefault(index, [])
            samples.append(completion)
            if len(samples) < rows[index].params.n:
                continue
            result = row_result(pending.pop(index), len(prompts[index]))
            if result.error is None and journal.path is not None and keys is not None:
                offset = journal.append(rows[index].id, keys[rows[index].id], result)
                results.journaled(index, offset, result.prompt_tokens, result.output_tokens)
            else:
                results.keep(index, result)
            observer.row_finished(result)
        stats = engine.stats
    journal.sync()
    missing = [i for i in range(len(rows)) if not results.has(i)]
    if missing:
        raise RuntimeError(f"engine finished without results for rows {missing[:MAX_LISTED_PROBLEMS]}")
    return results, stats


def fit_to_kv(rows: list[Row], prompts: PromptTokens, capacity: int) -> int:
    """Cap the ``max_tokens`` of rows that generate up to the context at what a KV cache of
    ``capacity`` tokens holds, rather than failing them as too large for it (a row that stops
    early fits; vLLM would refuse to start). Their journal keys keep the uncapped value.
    Returns how many rows were capped."""
    capped = 0
    for row in rows:
        if row.error or not row.up_to_context:
            continue
        room = capacity - len(prompts[row.index])
        if 1 <= room < row.params.max_tokens and row.params.min_tokens <= room:
            row.params = dataclasses.replace(row.params, max_tokens=room)
            capped += 1
    return capped


def step_stats(stats: EngineStats) -> StepStats:
    return StepStats(
        stats.prefill_tokens,
        stats.decode_tokens,
        stats.steps,
        stats.kv_blocks_used,
        stats.num_blocks,
        stats.live_saving,
    )


def run_info(
    config: JobConfig, checkpoint: Checkpoint, engine: EngineInfo, dtype_choice: str = ""
) -> RunInfo:
    """Model, device, dtype, sampling and KV of this run, for the log and the report."""
    defaults = job_defaults(checkpoint, config.sampling)
    if defaults.greedy:
        sampling = "greedy"
    else:
        sampling = f"temperature={defaults.temperature} top_p={defaults.top_p} top_k={defaults.top_k}"
    if defaults.n > 1:
        sampling += f" n={defaults.n}"
    architectures = getattr(checkpoint.config, "architectures", None) or [checkpoint.model_type]
    return RunInfo(
        model=str(config.model),
        architecture=architectures[0],
        device=engine.device,
        dtype=engine.dtype,
        sampling=sampling,
        max_tokens=defaults.max_tokens,
        kv_blocks=engine.num_blocks,
        block_size=engine.block_size,
        kv_bytes=engine.kv_cache_bytes,
        bundled_model=config.model.resolve() == BUNDLED_MODEL,
        attention=engine.attention_backend,
        dtype_choice=dtype_choice,
        attention_choice=engine.attention_backend_choice,
    )
