"""Where a run keeps its side files: hidden names beside the output.

Folder readers (``pyarrow.dataset``, Spark, Hive, ``datasets``) skip names that start with
``.`` or ``_``, so the lock, journal, report and errors file never break a reader pointed
at the folder holding the output::

    out.parquet                      the output
    .out.parquet.lock                the advisory lock of the run writing it (pid, host)
    .out.parquet.journal.jsonl       rows finished by an unfinished run (resume)
    .out.parquet.report.json         timings, counts, model, device, versions
    .out.parquet.errors.jsonl        the failed rows, when there are any
    .out.parquet.tokens/             the prompts' token ids, reused by a resumed run (token_cache.py)
"""

from __future__ import annotations

from pathlib import Path

LOCK, JOURNAL, REPORT, ERRORS = ".lock", ".journal.jsonl", ".report.json", ".errors.jsonl"
TOKENS = ".tokens"


def side_file(output: Path, suffix: str) -> Path:
    return output.with_name(f".{output.name}{suffix}")
