"""Arrow-backed prompt files: Parquet, and ``datasets`` folders saved with ``save_to_disk``.

Both are streamed in record batches: only the columns batchrun needs are decoded to
Python while reading, and on writing the input batches are re-read and extended with
the generated columns, so the input is never materialised as a DataFrame.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.core.errors import InputError
from batchrun.core.job.io.atomic import atomic_dir, atomic_file
from batchrun.core.job.io.source import OutputContext, PromptSource
from batchrun.core.job.rows import (
    EXPECTED_TOKENS,
    GENERATED_COLUMNS,
    Columns,
    OutputShape,
    RowResult,
    earlier_run_columns,
)
from batchrun.core.params import ROW_PARAM_KEYS

BATCH_ROWS = 4096

_TOKEN = [("token", pa.int64()), ("text", pa.string()), ("logprob", pa.float64())]
_TOP = pa.list_(pa.struct(_TOKEN))
_LOGPROBS = pa.list_(pa.struct([*_TOKEN, ("top", _TOP)]))


def generated_schema(shape: OutputShape, prefix: str = "") -> pa.Schema:
    fields = [
        ("output", pa.list_(pa.string()) if shape.samples else pa.string()),
        ("prompt_tokens", pa.int64()),
        ("cached_prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
    ]
    if shape.logprobs:
        fields.append(("logprobs", pa.list_(_LOGPROBS) if shape.samples else _LOGPROBS))
    return pa.schema([(prefix + name, type_) for name, type_ in fields])


def needed_columns(path: Path, schema: pa.Schema, columns: Columns) -> list[str]:
    names = set(schema.names)
    maybe_param = {f.name: pa.types.is_integer(f.type) or pa.types.is_null(f.type) for f in schema}
    if earlier_run_columns(str(path), maybe_param, columns):
        names -= {columns.generated(name) for name in GENERATED_COLUMNS}  # replaced, not read
    if columns.prompt not in names and columns.messages not in names:
        raise InputError(
            f"{path}: no '{columns.prompt}' or '{columns.messages}' column "
            f"(columns are {sorted(names)}); name yours with --prompt-column or --messages-column"
        )
    wanted = (columns.prompt, columns.messages, columns.id, *ROW_PARAM_KEYS, EXPECTED_TOKENS)
    return [c for c in wanted if c in names]


def _records(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[str, dict[str, Any]]]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield f"row {row}", record


def _with_generated(
    batch: pa.RecordBatch | pa.Table, results: Sequence[RowResult], shape: OutputShape, prefix: str
):
    """Drop any generated columns a previous run left, then append this run's."""
    generated = {prefix + name for name in GENERATED_COLUMNS}
    kept = [name for name in batch.schema.names if name not in generated]
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    table = table.select(kept)
    rows = [r.columns(shape, prefix) for r in results]
    for field in generated_schema(shape, prefix):
        table = table.append_column(field, pa.array([row[field.name] for row in rows], type=field.type))
    return table


def without_generated(schema: pa.Schema, columns: Columns) -> pa.Schema:
    """``schema`` less the columns an earlier run generated (they are replaced)."""
    generated = {columns.generated(name) for name in GENERATED_COLUMNS}
    kept = [field for field in schema if field.name not in generated]
    return pa.schema(kept, metadata=schema.metadata)


def conform(batch: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.Table:
    """``batch`` with exactly ``schema``'s columns, in its order and types (a shard without a
    column gets nulls; narrower types are widened)."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    arrays = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def limit_batches(batches: Iterator[pa.RecordBatch], limit: int | None) -> Iterator[pa.RecordBatch]:
    """The batches holding the first ``limit`` rows (the last one sliced)."""
    left = limit
    for batch in batches:
        if left is not None and batch.num_rows >= left:
            if left:
                yield batch.slice(0, left)
            return
        if left is not None:
            left -= batch.num_rows
        yield batch


def write_parquet(
    output: Path,
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch | pa.Table],
    results: Sequence[RowResult],
    context: OutputContext,
    prefix: str,
) -> None:
    """Write ``batches`` (input rows, ``schema``) with the generated columns of ``results``
    appended, one record batch at a time, atomically; one output row per input row."""
    out_schema = pa.schema([*schema, *generated_schema(context.shape, prefix)], metadata=schema.metadata)
    start = 0
    with atomic_file(output) as tmp, pq.ParquetWriter(tmp, out_schema) as writer:
        for batch in batches:
            rows = results[start : start + batch.num_rows]
            if len(rows) != batch.num_rows:
                raise ValueError(f"more input rows than the {len(results)} results")
            start += batch.num_rows
            writer.write_table(_with_generated(conform(batch, schema), rows, context.shape, prefix))
    if start != len(results):
        raise ValueError(f"{len(results)} results for {start} rows")


class ParquetSource(PromptSource):
    format_name = "parquet"

    def _file(self) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: not a readable Parquet file ({exc})") from None

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        pf = self._file()
        needed = needed_columns(self.path, pf.schema_arrow, self.columns)
        yield from _records(pf.iter_batches(batch_size=BATCH_ROWS, columns=needed))

    def input_schema(self) -> pa.Schema:
        return without_generated(self._file().schema_arrow, self.columns)

    def input_batches(self) -> Iterator[pa.RecordBatch]:
        """The input rows (up to ``limit``) in record batches, every column decoded."""
        return limit_batches(self._file().iter_batches(batch_size=BATCH_ROWS), self.limit)

    def write(self, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
        prefix = self.columns.output_prefix
        write_parquet(output, self.input_schema(), self.input_batches(), results, context, prefix)


class DatasetFolderSource(PromptSource):
    """A Hugging Face ``datasets`` folder (``Dataset.save_to_disk``); one split per folder."""

    format_name = "datasets"
    folder_output = True

    def _dataset(self):
        import datasets

        try:
            ds = datasets.load_from_disk(str(self.path))
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(f"{self.path}: not a datasets folder ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = ", ".join(f"{self.path}/{name}" for name in ds)
            raise InputError(f"{self.path} holds several splits; point at one of: {splits}")
        return ds

    def default_output(self) -> Path:
        return self.path.with_name(f"{self.path.name}.out")

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        ds = self._dataset()
        table = ds.data.table
        needed = needed_columns(self.path, table.schema, self.columns)
        yield from _records(table.select(needed).to_batches(max_chunksize=BATCH_ROWS))

    def input_schema(self) -> pa.Schema:
        return without_generated(self._dataset().data.table.schema, self.columns)

    def input_batches(self) -> Iterator[pa.RecordBatch]:
        table = self._dataset().data.table
        return limit_batches(iter(table.to_batches(max_chunksize=BATCH_ROWS)), self.limit)

    def write(self, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
        import datasets

        table = self._dataset().data.table
        if self.limit is not None:
            table = table.slice(0, self.limit)  # zero-copy
        if len(table) != len(results):
            raise ValueError(f"{len(results)} results for {len(table)} rows")
        out = datasets.Dataset(_with_generated(table, results, context.shape, self.columns.output_prefix))
        with atomic_dir(output) as tmp:
            out.save_to_disk(str(tmp))
