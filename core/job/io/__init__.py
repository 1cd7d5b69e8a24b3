"""Prompt files in and out: format detection, streaming readers, atomic writers."""

from __future__ import annotations

from pathlib import Path

from batchrun.core.errors import InputError
from batchrun.core.job.io.arrow import DatasetFolderSource, ParquetSource
from batchrun.core.job.io.compression import format_suffix, full_suffix
from batchrun.core.job.io.convert import JSONL_SUFFIXES, OutputTarget, output_target
from batchrun.core.job.io.jsonl import JsonlSource, OpenAIBatchSource, first_object, is_openai_batch
from batchrun.core.job.io.shards import ParquetShardsSource, is_glob
from batchrun.core.job.io.source import STDIO, OutputContext, PromptSource, spool_stdin
from batchrun.core.job.rows import Columns

__all__ = ["STDIO", "OutputContext", "OutputTarget", "PromptSource", "open_source", "output_target"]

STREAMABLE_FORMATS = ("jsonl", "openai-batch")  # may be written to stdout (-o -)
REWRITING_FORMATS = ("openai-batch",)  # the output is not the input plus columns: no --in-place


def open_source(path: Path, columns: Columns = Columns(), limit: int | None = None) -> PromptSource:
    """Pick the reader for ``path`` from its extension (and, for JSONL, its first line); a glob
    or a folder of ``.parquet`` files is read as shards. ``-`` reads JSONL from stdin (spooled to
    a temporary file: writing reads the input again). ``limit``: only the first rows."""
    source = _source(path, columns)
    source.limit = limit
    return source


def _source(path: Path, columns: Columns) -> PromptSource:
    if path == STDIO:
        path = spool_stdin()
    if is_glob(path):
        return ParquetShardsSource(path, columns)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return DatasetFolderSource(path, columns)
        if any(path.glob("*.parquet")):
            return ParquetShardsSource(path, columns)
        raise InputError(
            f"{path}: a folder, but neither a datasets folder saved with save_to_disk (expected "
            "state.json or dataset_dict.json in it) nor a folder of .parquet shards"
        )
    suffix = format_suffix(path)
    if suffix == ".parquet" and suffix == path.suffix.lower():
        return ParquetSource(path, columns)
    if suffix in JSONL_SUFFIXES:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: the file is empty; expected one JSON object per line")
        if is_openai_batch(first_object(path)):
            return OpenAIBatchSource(path)
        return JsonlSource(path, columns)
    raise InputError(
        f"{path}: unknown file type {full_suffix(path) or '(no extension)'!r}; batchrun reads "
        ".jsonl / .ndjson (optionally .gz or .zst), .parquet, a folder or glob of .parquet "
        "shards, or a datasets folder saved with save_to_disk"
    )
