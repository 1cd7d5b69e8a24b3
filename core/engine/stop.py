"""When a request is done: EOS, a stop string, or ``max_tokens``; and its final text."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from batchrun.core.sched.request import Request


class Verdict(NamedTuple):
    reason: str  # "stop" | "length"
    text: str


class StopChecker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def check(self, request: Request) -> Verdict | None:
        """Return the verdict if ``request``'s latest token finishes it, else None."""
        params = request.params
        output = request.output_ids
        if not params.ignore_eos and output[-1] in self.eos_token_ids:
            return Verdict("stop", self.decode(output[:-1]))
        if params.stop:
            text = self.decode(output)
            cut = _earliest_stop(text, params.stop)
            if cut is not None:
                return Verdict("stop", text[:cut])
            if len(output) >= params.max_tokens:
                return Verdict("length", text)
            return None
        if len(output) >= params.max_tokens:
            return Verdict("length", self.decode(output))
        return None


def _earliest_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
