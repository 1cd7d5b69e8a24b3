"""Arrow-backed prompt files: Parquet, and ``datasets`` folders saved with ``save_to_disk``.

Both are streamed in record batches: only the columns batchrun needs are decoded to
Python while reading, and on writing the input batches are re-read and extended with
the generated columns, so the input is never materialised as a DataFrame.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def _needed_columns(path: Path, schema: pa.Schema, columns: Columns) -> list[str]:
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


class ParquetSource(PromptSource):
    format_name = "parquet"

    def _file(self) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: not a readable Parquet file ({exc})") from None

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        pf = self._file()
        needed = _needed_columns(self.path, pf.schema_arrow, self.columns)
        yield from _records(pf.iter_batches(batch_size=BATCH_ROWS, columns=needed))

    def write(self, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
        pf = self._file()
        if pf.metadata.num_rows != len(results):
            raise ValueError(f"{len(results)} results for {pf.metadata.num_rows} rows")
        start = 0
        writer = None
        with atomic_file(output) as tmp:
            try:
                for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                    table = _with_generated(
                        batch,
                        results[start : start + batch.num_rows],
                        context.shape,
                        self.columns.output_prefix,
                    )
                    start += batch.num_rows
                    if writer is None:
                        schema = table.schema.with_metadata(pf.schema_arrow.metadata)
                        writer = pq.ParquetWriter(tmp, schema)
                    writer.write_table(table)
                if writer is None:  # no rows: still write the schema
                    empty = _with_generated(
                        pf.schema_arrow.empty_table(), [], context.shape, self.columns.output_prefix
                    )
                    writer = pq.ParquetWriter(tmp, empty.schema)
            finally:
                if writer is not None:
                    writer.close()


class DatasetFolderSource(PromptSource):
    """A Hugging Face ``datasets`` folder (``Dataset.save_to_disk``); one split per folder."""

    format_name = "datasets"

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
        needed = _needed_columns(self.path, table.schema, self.columns)
        yield from _records(table.select(needed).to_batches(max_chunksize=BATCH_ROWS))

    def write(self, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
        import datasets

        ds = self._dataset()
        if len(ds) != len(results):
            raise ValueError(f"{len(results)} results for {len(ds)} rows")
        out = datasets.Dataset(
            _with_generated(ds.data.table, results, context.shape, self.columns.output_prefix)
        )
        with atomic_dir(output) as tmp:
            out.save_to_disk(str(tmp))
