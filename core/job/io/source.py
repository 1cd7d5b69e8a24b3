"""The interface every prompt-file format implements."""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

from batchrun.core.job.io.compression import full_suffix
from batchrun.core.job.rows import Columns, OutputShape, RowResult

STDIO = Path("-")  # input from stdin, output to stdout (JSONL only)


def spool_stdin() -> Path:
    """Copy stdin to a temporary ``stdin.jsonl`` (removed at exit) and return its path."""
    folder = Path(tempfile.mkdtemp(prefix="batchrun-stdin-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "stdin.jsonl"
    with open(path, "wb") as f:
        shutil.copyfileobj(sys.stdin.buffer, f)
    return path


@dataclass(frozen=True)
class OutputContext:
    """Facts about the run the writers need: the generated columns' shape, and what some
    formats record (OpenAI batch responses)."""

    model_name: str
    created: int  # unix time the job finished
    shape: OutputShape = OutputShape()


class PromptSource(ABC):
    """A prompt file: streams its records, and writes them back with generated columns.

    ``records`` yields ``(location, fields)``: ``location`` names the line or row for
    messages, ``fields`` maps this source's ``columns`` names (and the sampling keys of
    ``ROW_PARAM_KEYS``) to values. ``write`` streams the input a second time and merges the
    results in, so neither direction holds the whole file in memory as Python objects.
    """

    format_name: ClassVar[str]
    folder_output: ClassVar[bool] = False  # the default output is a folder (datasets, shards)
    columns: Columns
    limit: int | None = None  # read and write only the first ``limit`` rows (--limit)
    # Sampling defaults of the format itself, under the model's and the job's (OpenAI: 1.0).
    base_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, path: Path, columns: Columns) -> None:
        self.path = path
        self.columns = columns

    def limited(self, items: Iterator[Any]) -> Iterator[Any]:
        """The first ``limit`` of ``items`` (all without a limit)."""
        return items if self.limit is None else islice(items, self.limit)

    @abstractmethod
    def records(self) -> Iterator[tuple[str, dict[str, Any]]]: ...

    @abstractmethod
    def write(self, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
        """Write one output record per input record, in input order, atomically."""

    def default_output(self) -> Path:
        """``prompts.jsonl`` -> ``prompts.out.jsonl`` beside the input (``.jsonl.gz`` kept whole)."""
        suffix = full_suffix(self.path)
        return self.path.with_name(f"{self.path.name[: len(self.path.name) - len(suffix)]}.out{suffix}")
