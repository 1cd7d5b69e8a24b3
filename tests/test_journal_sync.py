"""The journal's fsync policy: lines are flushed at once; fsync comes after ``sync_rows``
rows but at most once per ``min_sync_seconds``, and at least every ``sync_seconds``."""

from __future__ import annotations

from batchrun.core.job import journal as journal_module
from batchrun.core.job.journal import Journal
from batchrun.core.job.rows import RowResult


def test_fsync_after_sync_rows_at_most_once_per_min_sync_seconds(tmp_path, monkeypatch):
    clock = [100.0]
    synced: list[float] = []
    monkeypatch.setattr(journal_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(journal_module.os, "fsync", lambda fd: synced.append(clock[0]))
    journal = Journal(tmp_path / "j.jsonl", sync_rows=2, sync_seconds=5.0, min_sync_seconds=1.0)
    result = RowResult("x", 3, 1, "length")

    for i in range(6):  # six rows within one second: none fsynced yet, every line on disk
        journal.append(str(i), "k", result)
    assert synced == [] and len((tmp_path / "j.jsonl").read_bytes().splitlines()) == 6
    clock[0] += 1.0
    journal.append("6", "k", result)  # 7 unsynced rows and a second since the last sync
    assert synced == [101.0]
    journal.append("7", "k", result)  # one row: not due
    clock[0] += 5.0
    journal.append("8", "k", result)  # two rows, and five seconds anyway
    assert synced == [101.0, 106.0]
    journal.close()
