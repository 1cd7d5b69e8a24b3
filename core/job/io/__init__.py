"""Prompt files in and out: format detection, streaming readers, atomic writers."""

from __future__ import annotations

from pathlib import Path

from batchrun.core.errors import InputError
from batchrun.core.job.io.arrow import DatasetFolderSource, ParquetSource
from batchrun.core.job.io.jsonl import JsonlSource, OpenAIBatchSource, first_object, is_openai_batch
from batchrun.core.job.io.source import OutputContext, PromptSource
from batchrun.core.job.rows import Columns

__all__ = ["OutputContext", "PromptSource", "open_source"]

JSONL_SUFFIXES = {".jsonl", ".ndjson"}


def open_source(path: Path, columns: Columns = Columns()) -> PromptSource:
    """Pick the reader for ``path`` from its extension (and, for JSONL, its first line)."""
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
