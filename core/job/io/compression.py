"""Compressed JSONL (``.jsonl.gz``, ``.jsonl.zst``): streamed both ways, never decompressed
whole. gzip through the standard library, zstd through pyarrow's codec (already a dependency).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import BinaryIO, TextIO

import pyarrow as pa

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}  # file suffix -> codec


def compression_of(path: Path) -> str | None:
    """``gzip`` / ``zstd`` for a ``.gz`` / ``.zst`` name, else ``None``."""
    return COMPRESSIONS.get(path.suffix.lower())


def format_suffix(path: Path) -> str:
    """The extension naming the format, under any compression: ``a.jsonl.gz`` -> ``.jsonl``."""
    if compression_of(path) is not None:
        return Path(path.stem).suffix.lower()
    return path.suffix.lower()


def full_suffix(path: Path) -> str:
    """The format extension plus compression, as written: ``a.jsonl.gz`` -> ``.jsonl.gz``."""
    if compression_of(path) is not None:
        return Path(path.stem).suffix + path.suffix
    return path.suffix


def open_binary(path: Path) -> BinaryIO:
    """``path`` for reading, decompressed on the fly by its suffix."""
    codec = compression_of(path)
    if codec == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if codec == "zstd":
        return io.BufferedReader(pa.input_stream(str(path), compression="zstd"))  # type: ignore[arg-type]
    return open(path, "rb")


def open_text_writer(tmp: Path, compression: str | None) -> TextIO:
    """A UTF-8 text stream writing ``tmp``, compressed with ``compression`` (or not)."""
    if compression == "gzip":
        return gzip.open(tmp, "wt", encoding="utf-8")  # type: ignore[return-value]
    if compression == "zstd":
        return io.TextIOWrapper(pa.output_stream(str(tmp), compression="zstd"), encoding="utf-8")
    return open(tmp, "w", encoding="utf-8")
