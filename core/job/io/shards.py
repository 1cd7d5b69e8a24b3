"""Parquet shards: a folder of ``.parquet`` files (``data/``) or a glob (``'data/*.parquet'``).

Read in name order as one job: rows are numbered across the shards (the plan, the journal and
resume see one input), and messages name the shard. The default output is a folder beside the
input with one output shard per input shard, under the same names, each with its own input
schema plus the generated columns; ``-o x.parquet`` or ``-o x.jsonl`` merges them into one file.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.core.errors import InputError
from batchrun.core.job.io.arrow import (
    BATCH_ROWS,
    limit_batches,
    needed_columns,
    without_generated,
    write_parquet,
)
from batchrun.core.job.io.atomic import atomic_dir
from batchrun.core.job.io.source import OutputContext, PromptSource
from batchrun.core.job.rows import Columns, RowResult

GLOB_CHARS = "*?["


def is_glob(path: Path) -> bool:
    return any(c in str(path) for c in GLOB_CHARS) and not path.exists()


def shard_paths(path: Path) -> list[Path]:
    """The Parquet files of a glob or a folder, sorted by name (hidden files skipped)."""
    if path.is_dir():
        found = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    else:
        found = sorted(Path(p) for p in glob.glob(str(path)))
        others = [p for p in found if p.suffix.lower() != ".parquet" or not p.is_file()]
        if others:
            raise InputError(
                f"{path}: a glob of Parquet shards must match only .parquet files; it also matches "
                f"{', '.join(str(p) for p in others[:3])}"
            )
    if not found:
        raise InputError(f"{path}: no Parquet files match")
    names = [p.name for p in found]
    clashing = sorted({n for n in names if names.count(n) > 1})
    if clashing:
        raise InputError(
            f"{path}: several shards are named {clashing[0]!r}; output shards keep their input "
            "names, so the names must be unique"
        )
    return found


class ParquetShardsSource(PromptSource):
    format_name = "parquet-shards"
    folder_output = True

    def __init__(self, path: Path, columns: Columns) -> None:
        super().__init__(path, columns)
        self.shards = shard_paths(path)

    def _file(self, shard: Path) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(shard)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{shard}: not a readable Parquet file ({exc})") from None

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for shard in self.shards:
            pf = self._file(shard)
            needed = needed_columns(shard, pf.schema_arrow, self.columns)
            row = 0
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=needed):
                for record in batch.to_pylist():
                    row += 1
                    yield f"{shard.name} row {row}", record

    def input_schema(self) -> pa.Schema:
        """One schema for every shard (a column missing from a shard is null there)."""
        schemas = [without_generated(self._file(s).schema_arrow, self.columns) for s in self.shards]
        try:
            return pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"{self.path}: the shards' schemas do not agree ({exc})") from None

    def input_batches(self) -> Iterator[pa.RecordBatch]:
        batches = (
            batch for shard in self.shards for batch in self._file(shard).iter_batches(batch_size=BATCH_ROWS)
        )
        return limit_batches(batches, self.limit)

    def default_output(self) -> Path:
        folder = (self.path if self.path.is_dir() else self.path.parent).resolve()
        return folder.with_name(f"{folder.name}.out")

    def write(self, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
        """One output shard per input shard (those the ``limit`` reaches), built in a folder
        beside ``output`` and swapped in whole."""
        prefix = self.columns.output_prefix
        start = 0
        with atomic_dir(output) as tmp:
            tmp.mkdir()
            for shard in self.shards:
                pf = self._file(shard)
                left = len(results) - start
                if left == 0 and self.limit is not None:
                    break  # --limit stopped before this shard
                rows = min(pf.metadata.num_rows, left)
                schema = without_generated(pf.schema_arrow, self.columns)
                batches = limit_batches(pf.iter_batches(batch_size=BATCH_ROWS), rows)
                write_parquet(
                    tmp / shard.name, schema, batches, results[start : start + rows], context, prefix
                )
                start += rows
            if start != len(results):
                raise ValueError(f"{len(results)} results for {start} rows")
