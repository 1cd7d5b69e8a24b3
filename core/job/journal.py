"""The journal: every finished row is appended beside the output as it completes.

A crash, a SIGKILL or a full disk loses at most the rows finished since the last sync;
re-running the same command reads the journal back and generates only the rest. Each
entry is keyed by the row id and a hash of what determines its output (prompt tokens,
sampling parameters, effective seed, model identity), so a changed prompt, parameter or
model invalidates exactly the rows it affects.

Format: JSON lines ``{"id", "key", "result"}``. Lines are flushed as written and fsynced
in batches (every ``sync_rows`` rows or ``sync_seconds``), never once per token. A line
cut short by a crash is ignored on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO

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
    h.update(repr(params).encode())
    h.update(f"\x00{seed}\x00{model_identity}".encode())
    return h.hexdigest()


class Journal:
    """The journal at ``path``; with ``path=None`` (output to stdout) it keeps nothing."""

    def __init__(self, path: Path | None, sync_rows: int = 64, sync_seconds: float = 5.0) -> None:
        self.path = path
        self.sync_rows = sync_rows
        self.sync_seconds = sync_seconds
        self._file: IO[str] | None = None
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.appended = 0  # rows this run wrote

    def read(self, keys: dict[str, str]) -> tuple[dict[str, RowResult], int]:
        """Results of rows whose journaled key equals ``keys[id]``; and how many lines were
        unreadable (a line cut by a crash) or stale (another prompt, params or model)."""
        found: dict[str, RowResult] = {}
        skipped = 0
        if self.path is None or not self.path.exists():
            return found, 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    row_id, key, result = entry["id"], entry["key"], RowResult(**entry["result"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    skipped += 1
                    continue
                if keys.get(row_id) == key:
                    found[row_id] = result
                else:
                    skipped += 1
        return found, skipped

    def append(self, row_id: str, key: str, result: RowResult) -> None:
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open)
            self._repair_tail()
        line = json.dumps({"id": row_id, "key": key, "result": asdict(result)}, ensure_ascii=False)
        self._file.write(line + "\n")
        self._file.flush()
        self.appended += 1
        self._unsynced += 1
        if self._unsynced >= self.sync_rows or time.monotonic() - self._last_sync >= self.sync_seconds:
            self.sync()

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
                self._file.write("\n")
