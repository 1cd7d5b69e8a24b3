"""From engine completions to a row's generated columns (one ``RowResult`` per row)."""

from __future__ import annotations

from batchrun.core.engine.stats import Completion
from batchrun.core.job.rows import OutputShape, Row, RowResult


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
