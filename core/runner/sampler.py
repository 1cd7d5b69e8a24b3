"""Next-token selection for one step, batched and on the logits' device.

* Logits processors first, for the rows that ask (vLLM's), batched: repetition, presence and
  frequency penalties over all penalised rows at once (their token counts one scatter), and
  ``min_tokens`` (EOS and stop tokens masked, one indexed write).
* Greedy rows: one argmax over all of them.
* Sampled rows, all at once: temperature, then top-k, min-p and top-p on the sorted
  distribution, then the Gumbel-max trick — ``argmax(logits / T + g)`` with Gumbel noise
  ``g = -log(-log(u))`` draws exactly from the filtered softmax.
* Penalties and sampling work on at most ``SAMPLE_CHUNK_ELEMENTS`` (rows x vocab) at a time,
  which bounds their memory; rows are independent, so this changes no token.

The uniform ``u`` of token ``v`` in output position ``k`` of a request seeded ``s`` is a hash of
``(s, k, v)`` computed with integer tensor ops (counter-based, like Philox), not a generator's
state: a row's sample depends on nothing but the row — not on the rows beside it, a
preemption, the worker, or the device. Only the sampled ids come back to the host, once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from batchrun.core.params import SamplingParams

_LOW32 = 0xFFFFFFFF
# Rows x vocab per ``sample_rows`` call. Its temporaries (the sort's values and indices, the
# probabilities, the hash in int64 lanes) take ~50 bytes per element: 2^24 elements bound a
# step's sampling workspace to under 1 GiB whatever the batch (4,096 rows of a 152k vocabulary
# would otherwise want ~30 GB). Rows are independent, so chunking changes no token.
SAMPLE_CHUNK_ELEMENTS = 1 << 24


class History(NamedTuple):
    """The tokens a request has seen: what penalties and ``min_tokens`` look at."""

    prompt: np.ndarray  # (P,) int64
    output: np.ndarray  # (O,) int64, the tokens sampled so far


def sample(
    logits: torch.Tensor,  # (R, vocab) float32
    params: list[SamplingParams],
    seeds: list[int | None],
    histories: list[History],
    eos_token_ids: tuple[int, ...] = (),
    chunk_elements: int = SAMPLE_CHUNK_ELEMENTS,
) -> list[int]:
    """One token per row of ``logits`` (changed in place where a row has processors)."""
    output_lens = [len(h.output) for h in histories]
    vocab = logits.shape[1]
    penalized = [i for i, p in enumerate(params) if p.penalized]
    for part, rows in _row_chunks(penalized, logits, chunk_elements):
        block = logits[rows]  # (P, V), a copy
        apply_penalties(block, [params[i] for i in part], [histories[i] for i in part])
        logits[rows] = block
    banned = [  # (row, token) pairs masked while a row is below its min_tokens
        (i, t)
        for i, p in enumerate(params)
        if output_lens[i] < p.min_tokens
        for t in (*(() if p.ignore_eos else eos_token_ids), *p.stop_token_ids)
        if t < vocab
    ]
    if banned:
        pairs = torch.tensor(banned, device=logits.device)  # (B, 2): one copy for the step
        logits[pairs[:, 0], pairs[:, 1]] = float("-inf")
    tokens = torch.argmax(logits, dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    for part, rows in _row_chunks(sampled, logits, chunk_elements):
        tokens[rows] = sample_rows(
            logits[rows],
            [params[i] for i in part],
            [seeds[i] or 0 for i in part],
            [output_lens[i] for i in part],
        )
    return tokens.tolist()  # the step's one device-to-host copy


def _row_chunks(
    indices: list[int], logits: torch.Tensor, chunk_elements: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``indices`` in runs of at most ``chunk_elements`` logits each: (run, run on the device)."""
    rows_per_chunk = max(1, chunk_elements // logits.shape[1])
    for start in range(0, len(indices), rows_per_chunk):
        part = indices[start : start + rows_per_chunk]
        yield part, torch.tensor(part, device=logits.device)


def sample_rows(
    logits: torch.Tensor,  # (R, V) float32, rows that sample
    params: list[SamplingParams],
    seeds: list[int],
    positions: list[int],  # output index of the token being drawn, per row
) -> torch.Tensor:
    """Temperature, top-k, min-p, top-p and a counter-seeded Gumbel-max draw; (R,) int64."""
    device, vocab = logits.device, logits.shape[1]
    column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)[:, None]  # noqa: E731
    scaled = logits / column([p.temperature for p in params], torch.float32)
    ordered, order = torch.sort(scaled, dim=-1, descending=True)  # (R, V): best first
    rank = torch.arange(vocab, device=device)[None, :]
    top_k = column([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.int64)
    ordered = ordered.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)  # of what top-k left
    min_p = column([p.min_p for p in params], torch.float32)
    keep = probs >= min_p * probs[:, :1]
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    # top-p: the smallest prefix whose mass reaches top_p; the best token always stays
    top_p = column([p.top_p for p in params], torch.float32)
    keep &= torch.cumsum(probs, dim=-1) - probs < top_p
    keep[:, 0] = True
    noise = gumbel(column(seeds, torch.int64), column(positions, torch.int64), order)
    pick = torch.argmax(ordered.masked_fill(~keep, float("-inf")) + noise, dim=-1, keepdim=True)
    return order.gather(1, pick)[:, 0]


def gumbel(seeds: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Gumbel noise ``-log(-log(u))`` with ``u`` in (0, 1) a hash of (seed, position, token id);
    seeds, positions (R, 1) int64, tokens (R, V) int64 -> (R, V) float32.

    32-bit lanes in int64 tensors: the low 32 bits of every product are exact (int64 wraps),
    so the bits are the same on any device."""
    seed_lo, seed_hi = seeds & _LOW32, (seeds >> 32) & _LOW32
    x = (seed_lo ^ (positions * 0x9E3779B1 & _LOW32)) & _LOW32
    x = _mix32(x ^ seed_hi)
    x = _mix32(x ^ (tokens * 0x85EBCA77 & _LOW32))  # (R, V)
    x = _mix32(x ^ (positions * 0xC2B2AE3D & _LOW32))
    u = (x.to(torch.float64) + 0.5) / 2.0**32  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u)).to(torch.float32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 lanes holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _LOW32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _LOW32
    return x ^ (x >> 16)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], histories: list[History]) -> None:
    """vLLM's penalties on rows of logits ``(P, vocab)``, in place, all rows at once:
    repetition over the prompt and the output, presence and frequency over the output.

    Each row's output tokens are counted with one scatter over the batch (the ids copied to
    the device once, not once per row); a row with repetition_penalty 1 is left exactly as
    it was by that step (x / 1 and x * 1 are exact)."""
    device, (num_rows, vocab) = logits.device, logits.shape
    column = lambda values: torch.tensor(values, dtype=logits.dtype, device=device)[:, None]  # noqa: E731

    def scattered(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, token) index tensors of every token of ``arrays`` below the vocabulary."""
        rows = np.repeat(np.arange(num_rows), [len(a) for a in arrays])
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        inside = tokens < vocab
        pairs = torch.from_numpy(np.stack([rows[inside], tokens[inside]])).to(device)
        return pairs[0], pairs[1]

    counts = torch.zeros(num_rows, vocab, dtype=logits.dtype, device=device)
    rows, tokens = scattered([h.output for h in histories])
    counts.index_put_((rows, tokens), torch.ones((), dtype=logits.dtype, device=device), accumulate=True)
    repetition = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in repetition):
        seen = counts > 0
        seen[scattered([h.prompt for h in histories])] = True
        penalty = column(repetition)
        logits.copy_(torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits))
    frequency, presence = (
        column([p.frequency_penalty for p in params]),
        column([p.presence_penalty for p in params]),
    )
    logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)


def token_logprobs(logits: torch.Tensor, chosen: list[int], top: int) -> list[dict]:
    """Log-probabilities under the model's raw distribution (before temperature or top-k/p,
    as vLLM reports them): of each chosen token, and the ``top`` most likely alternatives.

    ``logits``: ``(S, vocab)``; returns one ``{"token", "logprob", "top": [...]}`` per row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(1, torch.tensor(chosen, device=logits.device)[:, None])[:, 0].tolist()
    entries = [{"token": t, "logprob": lp, "top": []} for t, lp in zip(chosen, picked, strict=True)]
    if top > 0:
        values, ids = torch.topk(logprobs, top, dim=-1)
        for entry, vs, ts in zip(entries, values.tolist(), ids.tolist(), strict=True):
            entry["top"] = [{"token": t, "logprob": v} for t, v in zip(ts, vs, strict=True)]
    return entries
