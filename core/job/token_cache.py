"""The token cache: every prompt's token ids, kept beside the output so they are computed
once per input.

Tokenizing a million chat rows takes minutes; planning them takes seconds. ``batchrun plan``
leaves the ids beside the default output, and ``batchrun run`` (after ``plan``, with
``--plan``, or resuming a run that died) memory-maps them instead of tokenizing again::

    .out.jsonl.tokens/
        tokens.bin       int32, every row's ids back to back (memory-mapped on reading)
        offsets.npy      int64 [rows + 1]: row i is tokens[offsets[i]:offsets[i + 1]]
        meta.json        the key, and the rows the template or tokenizer failed on

The key hashes what the ids depend on: the input file's identity (path, size, mtime and
the bytes of its first and last MiB), its format, the prompt and messages columns, and the
tokenizer's identity (its files, the chat template in effect, the template's keyword
arguments, the ``tokenizers`` version). A cache with another key is ignored and replaced,
so it is invalidated exactly when one of those changes; deleting it only costs the
tokenization. A finished run removes it with the journal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from batchrun.core.checkpoint import Checkpoint
from batchrun.core.job.io import PromptSource
from batchrun.core.job.side_files import TOKENS, side_file
from batchrun.core.planner.prompt_tokens import TOKEN_DTYPE, PromptTokens, TokenSink

CACHE_VERSION = 1
HEAD_TAIL_BYTES = 1 << 20
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENS_FILE, OFFSETS_FILE, META_FILE = "tokens.bin", "offsets.npy", "meta.json"


def file_identity(path: Path, files: list[Path] | None = None) -> list[Any]:
    """Path, size, mtime and a hash of the first and last MiB of ``path`` (every file of a
    folder input, by relative name; or the given ``files``, e.g. the shards a glob names)."""
    if files is None:
        path = path.resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    found: list[Any] = [str(path)]
    for file in files:
        stat = file.stat()
        h = hashlib.blake2b(digest_size=16)
        with open(file, "rb") as f:
            h.update(f.read(HEAD_TAIL_BYTES))
            if stat.st_size > HEAD_TAIL_BYTES:
                f.seek(max(stat.st_size - HEAD_TAIL_BYTES, HEAD_TAIL_BYTES))
                h.update(f.read())
        name = str(file.relative_to(path)) if path.is_dir() else file.name
        found.append([name, stat.st_size, stat.st_mtime_ns, h.hexdigest()])
    return found


def tokenizer_identity(checkpoint: Checkpoint) -> list[Any]:
    """What the ids depend on besides the input: tokenizer files, template in effect, its
    keyword arguments, the tokenizer class and the ``tokenizers`` library's version."""
    import tokenizers

    h = hashlib.blake2b(digest_size=16)
    for name in TOKENIZER_FILES:
        file = checkpoint.path / name
        if file.is_file():
            h.update(name.encode() + b"\x00" + file.read_bytes() + b"\x00")
    tokenizer = checkpoint.tokenizer
    return [
        h.hexdigest(),
        tokenizer.chat_template,
        checkpoint.chat_template_kwargs,
        type(tokenizer).__name__,
        tokenizers.__version__,
    ]


def cache_key(source: PromptSource, checkpoint: Checkpoint) -> str:
    parts = {
        "version": CACHE_VERSION,
        "input": file_identity(source.path, getattr(source, "shards", None)),
        "limit": source.limit,
        "format": source.format_name,
        "columns": [source.columns.prompt, source.columns.messages],
        "tokenizer": tokenizer_identity(checkpoint),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def cache_path(output: Path) -> Path:
    return side_file(output, TOKENS)


class TokenCache:
    """The cache folder at ``path`` for the job whose ids hash to ``key``."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self._staging: Path | None = None
        self.hit = False  # set when ``load`` found the ids

    @classmethod
    def beside(cls, output: Path, source: PromptSource, checkpoint: Checkpoint) -> TokenCache:
        """The cache of ``source``'s ids beside ``output`` (a file path, not stdout)."""
        return cls(cache_path(output), cache_key(source, checkpoint))

    def load(self, num_rows: int | None = None) -> tuple[PromptTokens, dict[int, str]] | None:
        """The cached ids and tokenizer errors by row, or ``None`` if absent, stale, damaged
        or (given ``num_rows``) made for another number of rows."""
        try:
            meta = json.loads((self.path / META_FILE).read_text())
            if meta.get("key") != self.key or num_rows not in (None, meta.get("rows")):
                return None
            offsets = np.load(self.path / OFFSETS_FILE)
            tokens = _map_tokens(self.path / TOKENS_FILE, int(offsets[-1]))
            if len(offsets) != meta["rows"] + 1:
                return None
            errors = {int(k): str(v) for k, v in meta.get("errors", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        self.hit = True
        return PromptTokens(tokens, offsets), errors

    def sink(self) -> TokenSink:
        """A sink writing the ids into a staging folder beside the cache; ``commit`` then
        puts it in place. ``OSError`` if the folder is not writable."""
        self._staging = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir()
        return FileTokenSink(self._staging)

    def commit(self, num_rows: int, errors: dict[int, str]) -> None:
        """Write the key and errors, then rename the staging folder over the cache."""
        staging, self._staging = self._staging, None
        if staging is None:
            return
        meta = {"key": self.key, "rows": num_rows, "errors": {str(k): v for k, v in errors.items()}}
        (staging / META_FILE).write_text(json.dumps(meta, ensure_ascii=False))
        self.remove()
        os.replace(staging, self.path)

    def abandon(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class FileTokenSink(TokenSink):
    """Appends each chunk's ids to ``folder/tokens.bin`` as it comes (nothing held in
    memory but the lengths); ``finish`` memory-maps the file."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self._file = open(folder / TOKENS_FILE, "wb")  # noqa: SIM115 (closed in finish)

    def append(self, lengths: np.ndarray, tokens: np.ndarray) -> None:
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self._file.write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())

    def finish(self) -> PromptTokens:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        offsets = self.offsets()
        np.save(self.folder / OFFSETS_FILE, offsets)
        return PromptTokens(_map_tokens(self.folder / TOKENS_FILE, int(offsets[-1])), offsets)


def _map_tokens(path: Path, count: int) -> np.ndarray:
    if path.stat().st_size != count * np.dtype(TOKEN_DTYPE).itemsize:
        raise ValueError(f"{path}: size does not match its offsets")
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    # a plain ndarray view: results of NumPy operations on it are ordinary arrays
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(count,)).view(np.ndarray)
