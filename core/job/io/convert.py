"""The output's format: the input's own, or the one the output's name says (``-o x.parquet``
on JSONL input, ``-o x.jsonl.gz`` on Parquet, a datasets folder or shards to one file).

Every writer streams: JSONL → Parquet goes through record batches of ``BATCH_ROWS`` rows,
Arrow → JSONL one record batch at a time; every input column is kept, the generated ones are
added, one output row per input row, in input order, written atomically. What cannot be
converted is refused before any work, with the names that would work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import pyarrow as pa

from batchrun.core.errors import InputError
from batchrun.core.job.io.arrow import BATCH_ROWS, write_parquet
from batchrun.core.job.io.compression import compression_of, format_suffix
from batchrun.core.job.io.jsonl import write_lines
from batchrun.core.job.io.source import STDIO, OutputContext, PromptSource
from batchrun.core.job.rows import GENERATED_COLUMNS, RowResult

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_FORMATS = ("jsonl", "openai-batch")  # read line by line
ARROW_FORMATS = ("parquet", "parquet-shards", "datasets")  # read by record batch
WRITABLE_NAMES = ".jsonl / .ndjson (optionally .gz or .zst) or .parquet"


class Writer(Protocol):
    def __call__(self, results: Sequence[RowResult], context: OutputContext) -> None: ...


class OutputTarget(NamedTuple):
    path: Path  # STDIO for stdout
    write: Writer  # writes every row's results there, in the format the path names


def output_kind(output: Path) -> str | None:
    """``jsonl`` or ``parquet`` by the output's name (stdout is JSONL); ``None`` for a name
    without a file extension batchrun writes (a folder)."""
    if output == STDIO:
        return "jsonl"
    suffix = format_suffix(output)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet" and compression_of(output) is None:
        return "parquet"
    return None


def output_target(source: PromptSource, output: Path) -> OutputTarget:
    """How ``source`` is written to ``output``; ``InputError`` (before any work) if it cannot
    be. JSONL → Parquet reads the input once here to settle one schema for every batch."""
    kind = output_kind(output)
    if _same_format(source, kind, output):
        return OutputTarget(output, partial(_same, source, output))
    if kind == "jsonl" and source.format_name in ARROW_FORMATS:
        return OutputTarget(output, partial(_arrow_to_jsonl, source, output))
    if kind == "parquet" and source.format_name in ARROW_FORMATS:  # shards or datasets to one file
        return OutputTarget(output, partial(_arrow_to_parquet, source, source.input_schema(), output))
    if kind == "parquet" and source.format_name == "jsonl":
        return OutputTarget(output, partial(_jsonl_to_parquet, source, _jsonl_schema(source), output))
    raise InputError(_refusal(source, output, kind))


def _same(source: PromptSource, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
    source.write(output, results, context)


def _arrow_to_parquet(
    source: Any, schema: pa.Schema, output: Path, results: Sequence[RowResult], context: OutputContext
) -> None:
    write_parquet(output, schema, source.input_batches(), results, context, source.columns.output_prefix)


def _same_format(source: PromptSource, kind: str | None, output: Path) -> bool:
    if source.format_name in JSON_FORMATS:
        return kind == "jsonl"
    if source.folder_output:
        return kind is None and format_suffix(output) != ".parquet" and compression_of(output) is None
    return kind == "parquet"


def _refusal(source: PromptSource, output: Path, kind: str | None) -> str:
    name = "-o -" if output == STDIO else str(output)
    if source.format_name == "openai-batch":
        return (
            f"{name}: an OpenAI batch input's output is OpenAI batch response lines; name it "
            ".jsonl / .ndjson (optionally .gz or .zst)"
        )
    if kind is None and format_suffix(output) not in (".parquet", *JSONL_SUFFIXES):
        return (
            f"{name}: batchrun writes a {source.format_name} input as {WRITABLE_NAMES}"
            + (" or a folder like its input" if source.folder_output else "")
            + "; a datasets folder is written only from a datasets folder (write .parquet and "
            "read it with datasets.load_dataset('parquet', data_files=...))"
        )
    if format_suffix(output) == ".parquet":
        return f"{name}: batchrun writes {WRITABLE_NAMES}; Parquet cannot be compressed as a whole file"
    return f"{name}: a {source.format_name} input is written as {WRITABLE_NAMES}"


def _without_generated(obj: dict[str, Any], generated: set[str]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in generated}


def _arrow_to_jsonl(source: Any, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
    """Parquet, shards or a datasets folder to JSONL, one record batch decoded at a time."""
    prefix = source.columns.output_prefix
    generated = {prefix + name for name in GENERATED_COLUMNS}
    objects = (obj for batch in source.input_batches() for obj in batch.to_pylist())

    def lines() -> Iterator[dict[str, Any]]:
        for obj, result in zip(objects, results, strict=True):
            yield _without_generated(obj, generated) | result.columns(context.shape, prefix)

    write_lines(output, lines())


def _chunks(objects: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    while chunk := list(islice(objects, BATCH_ROWS)):
        yield chunk


def _table(chunk: list[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """``chunk``'s rows as columns: every key any row has (missing values are null)."""
    if schema is None:
        names = list(dict.fromkeys(k for obj in chunk for k in obj))
        return pa.table({k: _column(k, [obj.get(k) for obj in chunk]) for k in names})
    arrays = [pa.array([obj.get(f.name) for obj in chunk], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _column(name: str, values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise pa.ArrowTypeError(f"field {name!r}: {exc}") from None


def _jsonl_schema(source: Any) -> pa.Schema:
    """One Arrow schema for every line (null-only and integer columns widen as needed); a
    field whose values have no common type (text on one line, a number on another) is refused."""
    schema = None
    try:
        for chunk in _chunks(source.input_objects()):
            found = _table(chunk).schema
            schema = (
                found if schema is None else pa.unify_schemas([schema, found], promote_options="permissive")
            )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise InputError(
            f"{source.path}: cannot be written as Parquet, a field has values of different types ({exc}); "
            "give each field one type, or write JSONL (-o out.jsonl)"
        ) from None
    return schema if schema is not None else pa.schema([])


def _jsonl_to_parquet(
    source: Any, schema: pa.Schema, output: Path, results: Sequence[RowResult], context: OutputContext
) -> None:
    batches = (_table(chunk, schema) for chunk in _chunks(source.input_objects()))
    write_parquet(output, schema, batches, results, context, source.columns.output_prefix)
