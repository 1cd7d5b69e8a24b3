"""Preparing a job, shared by ``run``, ``plan`` and ``validate``: where the output goes, rows
read and checked, prompts tokenized and checked against the context, and the plan.

Everything here runs before the model loads, so a bad job fails in seconds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from transformers import PreTrainedTokenizerBase

from batchrun.core.checkpoint import Checkpoint
from batchrun.core.errors import InputError
from batchrun.core.job.config import MAX_LISTED_PROBLEMS
from batchrun.core.job.io import (
    PromptSource,
)
from batchrun.core.job.rows import Row, parse_row
from batchrun.core.job.token_cache import TokenCache
from batchrun.core.job.tokenize import TOKENIZE_CHUNK, Progress, RowTokenizer, tokenize_rows
from batchrun.core.params import ParamError, SamplingParams, row_seed
from batchrun.core.planner.prompt_tokens import PromptTokens


def read_rows(
    source: PromptSource, defaults: SamplingParams, on_chunk: Callable[[list[Row]], None] | None = None
) -> list[Row]:
    """Parse every record into a ``Row``; file-level problems raise ``InputError``.
    ``on_chunk`` sees the rows ``TOKENIZE_CHUNK`` at a time, in order, as they are read."""
    rows: list[Row] = []
    chunk_start = 0
    for index, (location, fields) in enumerate(source.limited(source.records())):
        rows.append(parse_row(index, location, fields, source.columns, defaults))
        if on_chunk is not None and len(rows) - chunk_start == TOKENIZE_CHUNK:
            on_chunk(rows[chunk_start:])
            chunk_start = len(rows)
    if on_chunk is not None and len(rows) > chunk_start:
        on_chunk(rows[chunk_start:])
    if not rows:
        raise InputError(f"{source.path}: no rows; the file is empty")
    check_unique_ids(source, rows)
    return rows


class TokenizedRows(NamedTuple):
    tokenizer: PreTrainedTokenizerBase
    prompts: PromptTokens
    max_context: int
    over_context: list[int]  # rows just marked for exceeding the context


class ReadRows(NamedTuple):
    rows: list[Row]
    tokenized: TokenizedRows
    tokenize_s: float  # of the reading time, spent tokenizing
    cache: TokenCache | None  # the cache the ids came from, if any


def read_and_tokenize(
    source: PromptSource,
    defaults: SamplingParams,
    checkpoint: Checkpoint,
    *,
    caches: Sequence[TokenCache | None] = (),
    progress: Progress | None = None,
) -> ReadRows:
    """Read every row and tokenize it as it is read, one chunk at a time, dropping each
    chunk's prompt text once tokenized (``run`` and ``plan``; see ``tokenize_for``).

    The ids come from the first of ``caches`` that holds them for this input and tokenizer;
    else they are computed into the first cache (when its folder is writable)."""
    caches = [cache for cache in caches if cache is not None]
    for cache in caches:
        found = cache.load()
        if found is None:
            continue
        rows = read_rows(source, defaults, on_chunk=drop_prompt_text)
        prompts, errors = found
        if len(prompts) != len(rows):
            cache.hit = False
            continue
        for index, message in errors.items():
            rows[index].error = rows[index].error or message
        if progress is not None:
            progress(len(rows), len(rows))
        over = check_context(rows, prompts, checkpoint.max_context)
        return ReadRows(
            rows, TokenizedRows(checkpoint.tokenizer, prompts, checkpoint.max_context, over), 0.0, cache
        )

    cache = caches[0] if caches else None
    try:
        sink = cache.sink() if cache is not None else None
    except OSError:  # an unwritable folder only costs the cache
        cache, sink = None, None
    streamer = RowTokenizer(
        checkpoint.tokenizer, checkpoint.chat_template_kwargs, sink=sink, progress=progress, drop_text=True
    )

    def tokenize_chunk(chunk: list[Row]) -> None:
        check_chat_template(checkpoint, chunk)
        streamer.add(chunk)

    try:
        rows = read_rows(source, defaults, on_chunk=tokenize_chunk)
        prompts = streamer.finish(rows)
    except BaseException:
        if cache is not None:
            cache.abandon()
        raise
    if progress is not None:
        progress(len(rows), len(rows))
    if cache is not None:
        try:
            cache.commit(len(rows), streamer.errors)
        except OSError:
            cache.abandon()
    over = check_context(rows, prompts, checkpoint.max_context)
    tokenized = TokenizedRows(checkpoint.tokenizer, prompts, checkpoint.max_context, over)
    return ReadRows(rows, tokenized, streamer.seconds, None)


def check_chat_template(checkpoint: Checkpoint, rows: list[Row]) -> None:
    """Chat rows for a model without a chat template are a model-level error."""
    if checkpoint.tokenizer.chat_template:
        return
    chat = next((row for row in rows if row.messages is not None and not row.error), None)
    if chat is not None:
        raise InputError(
            f"{checkpoint.path}: the tokenizer has no chat template, but {chat.location} "
            "(and maybe others) is a chat; pass --chat-template FILE, or send 'prompt' rows"
        )


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
    """Give rows ``up_to_context`` their ``max_tokens`` (what the context leaves after the
    prompt, capped by the job's); mark rows whose prompt plus ``max_tokens`` cannot fit in the
    model's context and return their indices."""
    marked = []
    lengths = prompts.lengths.tolist()
    for row, length in zip(rows, lengths, strict=True):
        if row.error:
            continue
        if row.up_to_context:
            room = max_context - length
            if room < 1:
                row.error = (
                    f"{row.location}: the prompt ({length} tokens) fills the model's context of "
                    f"{max_context} tokens; no room to generate"
                )
                marked.append(row.index)
                continue
            try:
                row.params = row.params.with_overrides({"max_tokens": min(row.params.max_tokens, room)})
            except ParamError as exc:  # min_tokens above what the context leaves
                row.error = f"{row.location}: {exc} (max_tokens is what the context leaves after the prompt)"
            continue
        if length + row.params.max_tokens > max_context:
            row.error = (
                f"{row.location}: prompt ({length} tokens) + max_tokens ({row.params.max_tokens}) "
                f"exceeds the model's context of {max_context} tokens; shorten the prompt or lower max_tokens"
            )
            marked.append(row.index)
    return marked


def job_defaults(
    checkpoint: Checkpoint, sampling: dict[str, Any], source: PromptSource | None = None
) -> SamplingParams:
    """Row defaults: the format's own (OpenAI: temperature 1.0), overridden by the checkpoint's
    generation config, overridden by the job's options. Rows that may generate up to the context
    start from ``max_tokens`` = the whole context, or the job's cap if it sets one."""
    base = dict(source.base_defaults) if source is not None else {}
    if source is not None and source.format_name == "openai-batch":
        base["max_tokens"] = checkpoint.max_context
    return SamplingParams().with_overrides(base | checkpoint.sampling_defaults | sampling)


def tokenize_for(
    checkpoint: Checkpoint,
    rows: list[Row],
    *,
    caches: Sequence[TokenCache | None] = (),
    progress: Progress | None = None,
) -> TokenizedRows:
    """Tokenize ``rows`` with the checkpoint's tokenizer and mark those that overflow its
    context (as ``run``, ``plan`` and ``validate`` all do). Chat rows for a model without a
    chat template are a model-level error, raised before any row is tokenized.

    The ids come from the first of ``caches`` that holds them for this input and tokenizer
    (its ``hit`` is then set); else they are computed and written to the first cache (when
    its folder is writable). ``progress(done, total)`` follows the tokenization."""
    tokenizer, max_context = checkpoint.tokenizer, checkpoint.max_context
    check_chat_template(checkpoint, rows)
    caches = [cache for cache in caches if cache is not None]
    for cache in caches:
        found = cache.load(len(rows))
        if found is not None:
            prompts, errors = found
            for index, message in errors.items():
                rows[index].error = rows[index].error or message
            if progress is not None:
                progress(len(rows), len(rows))
            break
    else:
        prompts = _tokenize_into(caches[0] if caches else None, rows, checkpoint, progress)
    return TokenizedRows(tokenizer, prompts, max_context, check_context(rows, prompts, max_context))


def _tokenize_into(
    cache: TokenCache | None, rows: list[Row], checkpoint: Checkpoint, progress: Progress | None
) -> PromptTokens:
    tokenizer, kwargs = checkpoint.tokenizer, checkpoint.chat_template_kwargs
    try:
        sink = cache.sink() if cache is not None else None
    except OSError:  # an unwritable folder only costs the cache
        cache, sink = None, None
    errors: dict[int, str] = {}
    try:
        prompts = tokenize_rows(rows, tokenizer, kwargs, sink=sink, progress=progress, errors=errors)
    except BaseException:
        if cache is not None:
            cache.abandon()
        raise
    if cache is not None:
        try:
            cache.commit(len(rows), errors)
        except OSError:
            cache.abandon()
    return prompts


def drop_prompt_text(rows: list[Row]) -> None:
    """Forget every row's prompt text and messages once its ids are known (a million chats
    are gigabytes as Python objects; nothing after tokenization reads them)."""
    for row in rows:
        row.prompt = row.messages = None


def refuse_invalid_rows(source: PromptSource, rows: list[Row]) -> None:
    bad = [row.error for row in rows if row.error]
    if bad:
        listed = "\n  ".join(bad[:MAX_LISTED_PROBLEMS])
        raise InputError(f"{source.path}: {len(bad)} invalid row(s) (--strict):\n  {listed}")


def effective_seed(row: Row, job_seed: int) -> int:
    return row.params.seed if row.params.seed is not None else row_seed(job_seed, row.id)


def rows_by_id(rows: list[Row]) -> dict[str, int]:
    return {row.id: row.index for row in rows}
