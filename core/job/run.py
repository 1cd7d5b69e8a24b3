"""A whole job: read ▸ tokenize ▸ resume ▸ plan ▸ load ▸ generate ▸ write, in row order.

Everything that can be checked without the model (file format, row fields, duplicate ids,
an output location we can write, another run holding the output) is checked before the
model loads, so a bad job fails in seconds, not after minutes of loading. Finished rows go
to the journal as they complete; rows an earlier run journaled are not generated again.
The core never prints: it reports to a ``JobObserver`` and returns a ``JobSummary``; the
CLI renders both.
"""

from __future__ import annotations

import time
from pathlib import Path

from batchrun.core.checkpoint import Checkpoint, open_checkpoint
from batchrun.core.errors import InputError
from batchrun.core.job.config import (
    MAX_LISTED_PROBLEMS,
    JobConfig,
    JobObserver,
    JobSummary,
)
from batchrun.core.job.generate import generate
from batchrun.core.job.io import STDIO, OutputContext, PromptSource, open_source
from batchrun.core.job.io.atomic import remove_stale_temporaries
from batchrun.core.job.io.convert import Writer
from batchrun.core.job.journal import Journal, journal_path, row_key
from batchrun.core.job.lock import OutputLocked, is_locked, locked_message, output_lock
from batchrun.core.job.output_target import check_writable, job_output
from batchrun.core.job.planning import make_plan
from batchrun.core.job.prepare import (
    ReadRows,
    effective_seed,
    job_defaults,
    read_and_tokenize,
    refuse_invalid_rows,
    rows_by_id,
)
from batchrun.core.job.report import RunReport, errors_path, write_errors
from batchrun.core.job.results import output_shape
from batchrun.core.job.token_cache import TokenCache, cache_path
from batchrun.core.runner.model_loader import load_model
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
        loaded = source = None
        if len(plan.order) and config.distributed is not None:  # workers load it (at generate)
            from batchrun.core.distributed.driver import RaySource

            source = RaySource(config, rows, prompts, plan, observer, report)
        elif len(plan.order):  # a run resumed with every row journaled needs no model
            observer.phase("loading model")
            loaded = load_model(checkpoint, config.device, config.dtype)
            report.device = str(loaded.device)
        lap("load")

        observer.phase("generating")
        observer.started(len(rows), plan.summary.computed_tokens, plan.summary.expected_output_tokens)
        results, stats = generate(
            config, checkpoint, loaded, rows, prompts, plan, observer, journal, keys, resumed, report, source
        )
        if source is not None:
            report.device = source.device
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
