"""The journal: every finished row is appended beside the output as it completes.

A crash, a SIGKILL or a full disk loses at most the rows finished since the last sync;
re-running the same command reads the journal back and generates only the rest. Each
entry is keyed by the row id and a hash of what determines its output (prompt tokens,
sampling parameters, effective seed, model identity), so a changed prompt, parameter or
model invalidates exactly the rows it affects.

Format: JSON lines ``{"id", "key", "result"}``. Lines are flushed as written (a killed
process loses none) and fsynced in batches: after ``sync_rows`` rows but at most once per
``min_sync_seconds`` (short rows finishing by the hundred would otherwise spend a fifth of
their time in fsync), and at least every ``sync_seconds``; never once per token. A line
cut short by a crash is ignored on reading.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np

from batchrun.core.job.rows import RowResult
from batchrun.core.job.side_files import JOURNAL, side_file
from batchrun.core.params import SamplingParams


def journal_path(output: Path) -> Path:
    return side_file(output, JOURNAL)


def row_key(prompt: np.ndarray, params: SamplingParams, seed: int, model_identity: str) -> str:
    """What a row's output depends on, hashed."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(prompt, dtype=np.int32).tobytes())
    h.update(_params_text(params))
    h.update(f"\x00{seed}\x00{model_identity}".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1024)
def _params_text(params: SamplingParams) -> bytes:
    """``repr(params)`` encoded, once per distinct value (most rows share the job's defaults;
    a repr is slower than hashing the prompt's tokens)."""
    return repr(params).encode()


class Journaled(NamedTuple):
    """Where a journaled row's result is, and its token counts (for the summary)."""

    offset: int  # byte offset of its line in the journal
    prompt_tokens: int
    output_tokens: int


class Journal:
    """The journal at ``path``; with ``path=None`` (output to stdout) it keeps nothing."""

    def __init__(
        self, path: Path | None, sync_rows: int = 64, sync_seconds: float = 5.0, min_sync_seconds: float = 1.0
    ) -> None:
        self.path = path
        self.sync_rows = sync_rows
        self.sync_seconds = sync_seconds
        self.min_sync_seconds = min_sync_seconds
        self._file: IO[bytes] | None = None
        self._skipped = 0
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.appended = 0  # rows this run wrote

    def read(self, keys: dict[str, str]) -> tuple[dict[str, RowResult], int]:
        """Results of rows whose journaled key equals ``keys[id]``; and how many lines were
        unreadable (a line cut by a crash) or stale (another prompt, params or model)."""
        found = {row_id: result for row_id, (_, result) in self._valid(keys)}
        return found, self._skipped

    def index(self, keys: dict[str, str]) -> tuple[dict[str, Journaled], int]:
        """Where each valid row's result is (the last line of a row wins), without keeping
        the results; and how many lines were unreadable or stale."""
        found = {
            row_id: Journaled(offset, result.prompt_tokens, result.output_tokens)
            for row_id, (offset, result) in self._valid(keys)
        }
        return found, self._skipped

    def _valid(self, keys: dict[str, str]) -> Iterator[tuple[str, tuple[int, RowResult]]]:
        self._skipped = 0
        if self.path is None or not self.path.exists():
            return
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                start, offset = offset, offset + len(line)
                try:
                    row_id, key, result = parse_line(line)
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    self._skipped += 1
                    continue
                if keys.get(row_id) == key:
                    yield row_id, (start, result)
                else:
                    self._skipped += 1

    def append(self, row_id: str, key: str, result: RowResult) -> int:
        """Journal a finished row; the byte offset of its line (``-1`` without a journal)."""
        if self.path is None:
            return -1
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 (held open)
            self._repair_tail()
        # vars, not asdict: the same fields in the same order (RowResult holds no dataclass),
        # without asdict's recursive deep copy of every token id and logprob entry
        line = json.dumps({"id": row_id, "key": key, "result": vars(result)}, ensure_ascii=False)
        offset = self._file.tell()
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        self.appended += 1
        self._unsynced += 1
        since = time.monotonic() - self._last_sync
        due = self._unsynced >= self.sync_rows and since >= self.min_sync_seconds
        if due or since >= self.sync_seconds:
            self.sync()
        return offset

    def sync(self) -> None:
        if self._file is not None and self._unsynced:
            os.fsync(self._file.fileno())
            self._unsynced = 0
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None

    def discard(self) -> None:
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _repair_tail(self) -> None:
        """Start on a fresh line if a crash left the last one unfinished."""
        assert self._file is not None
        if self._file.tell() == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                self._file.write(b"\n")


def parse_line(line: bytes) -> tuple[str, str, RowResult]:
    """``(id, key, result)`` of a journal line; ``ValueError`` / ``KeyError`` / ``TypeError``
    if it is damaged."""
    entry = json.loads(line)
    return entry["id"], entry["key"], RowResult(**entry["result"])
