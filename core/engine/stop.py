"""When a request is done (EOS, a stop string, ``max_tokens``) and its final text.

Stop strings are checked incrementally: each new token is decoded on its own by the
tokenizer's streaming decoder (``tokenizers.decoders.DecodeStream``, which holds back
bytes of a character split across tokens), and only the new characters plus the longest
stop string's length of older text are searched. A row of L tokens costs O(L) in total,
not O(L²). The final text is decoded once, from all the output tokens, when the request
finishes, so it is exactly ``tokenizer.decode(output_ids)`` cut before the first stop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from batchrun.core.params import SamplingParams


class Verdict(NamedTuple):
    reason: str  # "stop" | "length"
    text: str


class StopState:
    """One request's decoded text so far, for the stop-string search."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._tokenizer = tokenizer
        self.text = ""
        self.floor = 0  # characters decoded before min_tokens: a stop string there does not count

    def advance(self, output_ids: list[int]) -> int:
        """Decode the newest token of ``output_ids``; return how many characters it added."""
        before = len(self.text)
        if self._stream is not None:
            self.text += self._stream.step(self._backend, output_ids[-1]) or ""
        else:  # a tokenizer without a streaming decoder: decode everything again
            self.text = self._tokenizer.decode(output_ids, skip_special_tokens=True)
        return len(self.text) - before


class StopChecker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def new_state(self) -> StopState:
        return StopState(self.tokenizer)

    def check(self, params: SamplingParams, output: list[int], state: StopState | None) -> Verdict | None:
        """The verdict if the latest token of ``output`` finishes the request, else None.
        ``state`` (one per request, advanced here) is needed when ``params.stop`` is set.

        As in vLLM: nothing but ``max_tokens`` ends a row before ``min_tokens``; a sampled
        EOS or stop token ends it, its text left out unless ``include_stop_str_in_output``
        (stop tokens only; EOS never shows); a stop string cuts the text before it (after
        it with ``include_stop_str_in_output``)."""
        last = output[-1]
        added = state.advance(output) if params.stop and state is not None else 0
        if len(output) < params.min_tokens and state is not None:
            state.floor = len(state.text)
        if len(output) >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                return Verdict("stop", self.decode(output[:-1]))
            if last in params.stop_token_ids:
                kept = output if params.include_stop_str_in_output else output[:-1]
                return Verdict("stop", self.decode(kept))
            if added:
                window = max(state.floor, len(state.text) - added - max(map(len, params.stop)) + 1)
                if _earliest_stop(state.text, params.stop, window) is not None:
                    return self._final(params, output, state)
        if len(output) >= params.max_tokens:
            return self._final(params, output, state)
        return None

    def _final(self, params: SamplingParams, output: list[int], state: StopState | None) -> Verdict:
        """The finished text: decoded once, cut at the earliest stop string after the
        ``min_tokens`` floor if one is there (else in the incremental text, in case the two
        decodings differ)."""
        text = self.decode(output)
        if params.stop and state is not None:
            for candidate in (text, state.text):
                hit = _earliest_stop(candidate, params.stop, state.floor)
                if hit is not None:
                    cut, stop = hit
                    end = cut + len(stop) if params.include_stop_str_in_output else cut
                    return Verdict("stop", candidate[:end])
        return Verdict("length", text)


def _earliest_stop(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    """(index, stop string) of the first stop string in ``text[start:]``, or None."""
    hits = [(i, s) for s, i in ((s, text.find(s, start)) for s in stops) if i >= 0]
    return min(hits) if hits else None
