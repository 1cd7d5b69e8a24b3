"""The generation phase of a job: the planned rows through the engine, each finished row
journaled at once; error rows and journaled rows get their record without the engine."""

from __future__ import annotations

import dataclasses

from batchrun.core.checkpoint import Checkpoint
from batchrun.core.engine.stats import Completion, EngineInfo, EngineStats
from batchrun.core.job.completion_source import CompletionSource, LocalEngine
from batchrun.core.job.config import (
    BUNDLED_MODEL,
    MAX_LISTED_PROBLEMS,
    JobConfig,
    JobObserver,
    RunInfo,
    StepStats,
)
from batchrun.core.job.journal import Journal, Journaled
from batchrun.core.job.prepare import (
    job_defaults,
)
from batchrun.core.job.report import RunReport
from batchrun.core.job.requests import RowSamples, make_requests, most_kv_tokens, segment_users
from batchrun.core.job.results import StoredResults, row_result
from batchrun.core.job.rows import Row, RowResult
from batchrun.core.planner.plan import Plan
from batchrun.core.planner.prompt_tokens import PromptTokens
from batchrun.core.runner.model_loader import LoadedModel


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
    source: CompletionSource | None = None,
) -> tuple[StoredResults, EngineStats | None]:
    """Run every planned row through the engine; invalid rows get their error record and
    journaled rows their journaled result. Each finished row is journaled at once and read
    back from the journal when the output is written, so results are not all held here.
    ``source`` computes the completions (default: an engine on ``loaded``, in this process;
    core/distributed gives one whose workers run elsewhere)."""
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
    stats = None
    if len(plan.order):
        if source is None:
            assert loaded is not None, "rows to generate but no model loaded"
            source = LocalEngine(loaded, config.engine)
        # Requests are made lazily, as the engine admits them; its sizing and each shared
        # segment's number of users come from arrays over the plan's order.
        planned = RowSamples(rows, prompts, plan)
        engine_info = source.start(most_kv_tokens(plan, planned, config.prefix_sharing))
        capacity = engine_info.num_blocks * engine_info.block_size
        if fitted := fit_to_kv(rows, prompts, capacity):
            observer.phase(
                f"{fitted} row(s) without their own max_tokens are capped at what the KV cache "
                f"holds ({capacity} tokens with the prompt) instead of the model's context"
            )
        requests = make_requests(rows, prompts, plan, config.seed, config.prefix_sharing)
        users = segment_users(plan, planned)
        observer.engine_started(engine_info)
        info = run_info(config, checkpoint, engine_info, source.dtype_choice)
        observer.run_info(info)
        if report is not None:
            report.run_info(info)
        pending: dict[int, list[Completion]] = {}
        on_step = lambda stats: observer.step(step_stats(stats))  # noqa: E731
        for completion in source.generate(requests, on_step=on_step, segment_users=users):
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
        stats = source.stats
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
        output_tokens=stats.sampled_tokens,
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
