"""Rows to token ids: chat template where the row is a chat, then batched fast tokenization.

Rows go through in chunks, in row order: each chunk's chats are rendered (Python, Jinja),
then its texts are encoded in one batch by the fast tokenizer, whose Rust code runs the
batch on all cores with the GIL released. Measured on the bundled tokenizer (2 cores, one
busy with other work): rendering runs at ~26k rows/s and encoding at ~0.5M tokens/s on one
thread, so encoding is the slow part; the tokenizer's own threads encoded 1.3-1.7x faster,
and two worker processes (render + encode each, results pickled back) were no faster than
the threads, so batchrun uses the threads. Each chunk's ids go straight into an int32 chunk
handed to a ``TokenSink`` (memory, or the token cache file), so memory stays ~4 bytes per
token plus one chunk.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from batchrun.core.job.rows import Row
from batchrun.core.planner.prompt_tokens import TOKEN_DTYPE, PromptTokens, TokenSink

TOKENIZE_CHUNK = 2048  # rows rendered and encoded per batch

Progress = Callable[[int, int], None]  # (rows done, rows total)


def render(
    row: Row, tokenizer: PreTrainedTokenizerBase, template_kwargs: dict[str, Any] | None = None
) -> str:
    """The prompt text of a row: raw text, or its messages through the chat template (with
    ``template_kwargs``, e.g. ``enable_thinking``)."""
    if row.messages is None:
        return row.prompt or ""
    if not tokenizer.chat_template:
        raise ValueError("the model's tokenizer has no chat template; send 'prompt' rows instead")
    return tokenizer.apply_chat_template(
        row.messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )


def tokenize_rows(
    rows: list[Row],
    tokenizer: PreTrainedTokenizerBase,
    template_kwargs: dict[str, Any] | None = None,
    *,
    sink: TokenSink | None = None,
    progress: Progress | None = None,
    errors: dict[int, str] | None = None,
) -> PromptTokens:
    """Token ids of every row that has a prompt or messages (length 0 for the others, and
    for rows the template or tokenizer fails on).

    Raw prompts get the tokenizer's special tokens (e.g. BOS); rendered chats already
    contain them. A row the template or tokenizer fails on gets ``row.error`` (also recorded
    in ``errors``, by row index); the others go on. The tokens depend on the rows' prompts and
    messages only, never on other row errors, so they can be cached per input file.
    """
    streamer = RowTokenizer(tokenizer, template_kwargs, sink=sink, progress=progress, total=len(rows))
    if errors is not None:
        streamer.errors = errors
    for start in range(0, len(rows), TOKENIZE_CHUNK):
        streamer.add(rows[start : start + TOKENIZE_CHUNK])
    return streamer.finish(rows)


class RowTokenizer:
    """Tokenizes rows chunk by chunk, in row order, as they are read (``add``); ``finish``
    gives every row's ids. With ``drop_text`` each chunk's prompt text and messages are
    dropped once tokenized, so a million chats are never all in memory as Python objects.
    ``total`` is the number of rows when known (0 if not), for ``progress``."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template_kwargs: dict[str, Any] | None = None,
        *,
        sink: TokenSink | None = None,
        progress: Progress | None = None,
        total: int = 0,
        drop_text: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.template_kwargs = template_kwargs
        self.sink = sink or TokenSink()
        self.progress = progress
        self.total = total
        self.drop_text = drop_text
        self.errors: dict[int, str] = {}  # row index -> message, for the rows that failed
        self.done = 0
        self.seconds = 0.0  # spent tokenizing (reading the rows not included)

    def add(self, chunk: list[Row]) -> None:
        start = time.perf_counter()
        lengths, flat = _tokenize_chunk(chunk, self.tokenizer, self.template_kwargs, self.errors)
        self.sink.append(lengths, flat)
        if self.drop_text:
            for row in chunk:
                row.prompt = row.messages = None
        self.done += len(chunk)
        self.seconds += time.perf_counter() - start
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finish(self, rows: list[Row]) -> PromptTokens:
        """Every row's ids (``rows`` are all the rows added, in order); failed rows get
        their ``error``."""
        for index, message in self.errors.items():
            rows[index].error = rows[index].error or message
        return self.sink.finish()


def _tokenize_chunk(
    chunk: list[Row], tokenizer, template_kwargs, errors: dict[int, str]
) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, tokens)`` of the chunk's rows, in row order."""
    ids: list[list[int]] = [[] for _ in chunk]
    pending: dict[bool, list[tuple[int, str]]] = {True: [], False: []}  # add special tokens?
    for k, row in enumerate(chunk):
        if row.prompt is None and row.messages is None:
            continue
        try:
            pending[row.messages is None].append((k, render(row, tokenizer, template_kwargs)))
        except Exception as exc:  # template errors are the row's, whatever their type
            errors[row.index] = f"{row.location}: the chat template failed on this row ({exc})"
    for add_special, items in pending.items():
        if items:
            _encode(items, add_special, chunk, ids, tokenizer, errors)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=TOKEN_DTYPE, count=int(lengths.sum()))
    return lengths, flat


def _encode(items, add_special, chunk, ids, tokenizer, errors) -> None:
    try:
        encoded = _batch_encode(tokenizer, [text for _, text in items], add_special)
    except Exception:  # isolate the bad row(s): retry one by one
        for item in items:
            if len(items) > 1:
                _encode([item], add_special, chunk, ids, tokenizer, errors)
            else:
                row = chunk[item[0]]
                errors[row.index] = f"{row.location}: the tokenizer failed on this row"
        return
    for (k, _), token_ids in zip(items, encoded, strict=True):
        if token_ids:
            ids[k] = token_ids
        else:
            row = chunk[k]
            errors[row.index] = f"{row.location}: the prompt tokenizes to no tokens"


def _batch_encode(tokenizer, texts: list[str], add_special: bool) -> list[list[int]]:
    """Ids of ``texts``: a fast tokenizer's Rust batch encoder (threads, GIL released, no
    offsets or masks computed), else the tokenizer's ``__call__`` (anything else, a wrapper
    included, is called as it is)."""
    backend = tokenizer._tokenizer if isinstance(tokenizer, PreTrainedTokenizerFast) else None
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    # transformers turns the backend's own truncation / padding off per call; we cannot
    if encode is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=add_special)["input_ids"]
    return [encoding.ids for encoding in encode(texts, add_special_tokens=add_special)]
