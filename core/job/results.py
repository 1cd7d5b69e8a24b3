"""From engine completions to a row's generated columns (one ``RowResult`` per row)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, overload

import numpy as np

from batchrun.core.engine.stats import Completion
from batchrun.core.job.journal import parse_line
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


class StoredResults(Sequence[RowResult]):
    """Every row's result, by row index, without holding them all: a row journaled (by this
    run or an earlier one) is read back from its journal line when asked for; failed rows
    and rows of a run without a journal (output to stdout) are kept here.

    Writers iterate it in row order (or slice it by record batch), once; the summary's
    counts come from ``prompt_tokens`` / ``output_tokens`` without reading the journal."""

    def __init__(self, num_rows: int, journal: Path | None) -> None:
        self.journal = journal
        self.offsets = np.full(num_rows, -1, dtype=np.int64)  # journal line of each row
        self.prompt_tokens = np.zeros(num_rows, dtype=np.int64)
        self.output_tokens = np.zeros(num_rows, dtype=np.int64)
        self.kept: dict[int, RowResult] = {}  # failed rows; every row without a journal
        self._file: IO[bytes] | None = None

    def journaled(self, index: int, offset: int, prompt_tokens: int, output_tokens: int) -> None:
        self.offsets[index] = offset
        self.prompt_tokens[index] = prompt_tokens
        self.output_tokens[index] = output_tokens

    def keep(self, index: int, result: RowResult) -> None:
        self.kept[index] = result
        self.prompt_tokens[index] = result.prompt_tokens
        self.output_tokens[index] = result.output_tokens

    def has(self, index: int) -> bool:
        return index in self.kept or self.offsets[index] >= 0

    def failed(self) -> list[int]:
        """Indices of the failed rows, in row order."""
        return sorted(i for i, result in self.kept.items() if result.error)

    def __len__(self) -> int:
        return len(self.offsets)

    @overload
    def __getitem__(self, index: int) -> RowResult: ...

    @overload
    def __getitem__(self, index: slice) -> list[RowResult]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if index in self.kept:
            return self.kept[index]
        offset = int(self.offsets[index])
        if offset < 0 or self.journal is None:
            raise KeyError(f"no result for row {index}")
        if self._file is None:
            self._file = open(self.journal, "rb")  # noqa: SIM115 (closed in close)
        self._file.seek(offset)
        return parse_line(self._file.readline())[2]

    def __iter__(self) -> Iterator[RowResult]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
