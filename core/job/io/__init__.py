"""Prompt files in and out: format detection, streaming readers, atomic writers."""

from __future__ import annotations

from pathlib import Path

from batchrun.core.errors import InputError
from batchrun.core.job.io.arrow import DatasetFolderSource, ParquetSource
from batchrun.core.job.io.jsonl import JsonlSource, OpenAIBatchSource, first_object, is_openai_batch
from batchrun.core.job.io.source import STDIO, OutputContext, PromptSource, spool_stdin
from batchrun.core.job.rows import Columns

__all__ = ["STDIO", "OutputContext", "PromptSource", "open_source"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# The output has the input's format; these are the names it may have.
OUTPUT_SUFFIXES = {"jsonl": JSONL_SUFFIXES, "openai-batch": JSONL_SUFFIXES, "parquet": (".parquet",)}
KNOWN_FILE_SUFFIXES = (*JSONL_SUFFIXES, ".parquet")
STREAMABLE_FORMATS = ("jsonl", "openai-batch")  # may be written to stdout (-o -)
REWRITING_FORMATS = ("openai-batch",)  # the output is not the input plus columns: no --in-place


def open_source(path: Path, columns: Columns = Columns()) -> PromptSource:
    """Pick the reader for ``path`` from its extension (and, for JSONL, its first line).
    ``-`` reads JSONL from stdin (spooled to a temporary file: writing reads the input again)."""
    if path == STDIO:
        path = spool_stdin()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return DatasetFolderSource(path, columns)
        raise InputError(
            f"{path}: a folder, but not a datasets folder saved with save_to_disk "
            "(expected state.json or dataset_dict.json in it)"
        )
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return ParquetSource(path, columns)
    if suffix in JSONL_SUFFIXES:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: the file is empty; expected one JSON object per line")
        if is_openai_batch(first_object(path)):
            return OpenAIBatchSource(path)
        return JsonlSource(path, columns)
    raise InputError(
        f"{path}: unknown file type {suffix or '(no extension)'!r}; batchrun reads "
        ".jsonl / .ndjson, .parquet, or a datasets folder saved with save_to_disk"
    )
