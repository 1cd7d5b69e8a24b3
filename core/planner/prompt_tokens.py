"""Every prompt of a job as one flat token array.

A million prompts of ~500 tokens are 2 GB as int32 here, and 15+ GB as Python lists of
ints; the planner and the engine only ever see this form. Prompt ``i`` is
``tokens[offsets[i]:offsets[i + 1]]``; a row with no usable prompt (an error row) has
length 0.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

TOKEN_DTYPE = np.int32  # vocabularies stay far below 2**31


@dataclass(frozen=True, eq=False)
class PromptTokens:
    tokens: np.ndarray  # int32 [total_tokens]
    offsets: np.ndarray  # int64 [num_rows + 1], offsets[0] == 0

    @classmethod
    def from_lists(cls, prompts: Sequence[Sequence[int] | None]) -> PromptTokens:
        builder = PromptTokensBuilder(len(prompts))
        for i, ids in enumerate(prompts):
            if ids:
                builder.set(i, ids)
        return builder.build()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.tokens[self.offsets[row] : self.offsets[row + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def digest(self) -> str:
        """Content hash of every row's tokens: a plan made for other tokens is refused."""
        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(self.offsets, dtype=np.int64).data)
        h.update(np.ascontiguousarray(self.tokens, dtype=TOKEN_DTYPE).data)  # no copy
        return h.hexdigest()


class PromptTokensBuilder:
    """Collects token ids batch by batch (rows in any order) as numpy chunks, never as one
    big Python list; ``build`` lays them out in row order."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self._lengths = np.zeros(num_rows, dtype=np.int64)
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # rows, lengths, tokens

    def set(self, row: int, ids: Sequence[int]) -> None:
        self.set_many([row], [ids])

    def set_many(self, rows: Iterable[int], prompts: Sequence[Sequence[int]]) -> None:
        rows = np.fromiter(rows, dtype=np.int64, count=len(prompts))
        lengths = np.fromiter(map(len, prompts), dtype=np.int64, count=len(prompts))
        all_ids = itertools.chain.from_iterable(prompts)
        flat = np.fromiter(all_ids, dtype=TOKEN_DTYPE, count=int(lengths.sum()))
        self._lengths[rows] = lengths
        self._chunks.append((rows, lengths, flat))

    def clear(self, row: int) -> None:
        """Drop a row's tokens (it turned out to be an error row)."""
        self._lengths[row] = 0

    def build(self) -> PromptTokens:
        offsets = np.zeros(self.num_rows + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=TOKEN_DTYPE)
        for rows, lengths, flat in self._chunks:
            kept = np.repeat(self._lengths[rows] == lengths, lengths)  # cleared rows drop out
            chunk_starts = np.cumsum(lengths) - lengths
            # token k of the chunk goes to offsets[row] + (k - start of its row in the chunk)
            shift = np.repeat(offsets[rows] - chunk_starts, lengths)
            dest = shift + np.arange(len(flat), dtype=np.int64)
            tokens[dest[kept]] = flat[kept]
        return PromptTokens(tokens, offsets)


class TokenSink:
    """Receives every row's tokens chunk by chunk, in row order; ``finish`` gives them as one
    ``PromptTokens``. This one keeps the chunks in memory."""

    def __init__(self) -> None:
        self._lengths: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []

    def append(self, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """The next ``len(lengths)`` rows: their lengths and their tokens, concatenated."""
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self._tokens.append(np.asarray(tokens, dtype=TOKEN_DTYPE))

    def offsets(self) -> np.ndarray:
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return offsets

    def finish(self) -> PromptTokens:
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros(0, dtype=TOKEN_DTYPE)
        self._tokens = []
        return PromptTokens(tokens, self.offsets())
