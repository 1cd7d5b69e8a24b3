"""Next-token selection for one step: greedy rows in one argmax; sampled rows (temperature,
top-k, top-p, min-p) each with a generator seeded from the request's seed and the token's
index. Before either, the rows that ask for them get vLLM's logits processors: repetition,
presence and frequency penalties, and ``min_tokens`` (EOS and stop tokens masked).

Seeding by ``(seed, k)`` for output token ``k`` makes a sample depend on nothing but the
row: not on which rows share its step, not on a preemption, not on which worker runs it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from batchrun.core.params import SamplingParams

_MASK64 = (1 << 64) - 1


def token_seed(seed: int, index: int) -> int:
    """A 63-bit seed for output token ``index`` of a request seeded ``seed`` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


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
) -> list[int]:
    """One token per row of ``logits`` (changed in place where a row has processors)."""
    output_lens = [len(h.output) for h in histories]
    for i, p in enumerate(params):
        if p.penalized:
            apply_penalties(logits[i], p, histories[i])
        if output_lens[i] < p.min_tokens:
            banned = [
                t
                for t in (*(() if p.ignore_eos else eos_token_ids), *p.stop_token_ids)
                if t < logits.shape[1]
            ]
            logits[i, banned] = float("-inf")
    tokens = torch.argmax(logits, dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            generator = torch.Generator().manual_seed(token_seed(seeds[i] or 0, output_lens[i]))
            tokens[i] = _sample_one(logits[i], p, generator)
    return tokens


def _sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    logits = logits.cpu() / params.temperature  # (vocab,)
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def apply_penalties(logits: torch.Tensor, params: SamplingParams, history: History) -> None:
    """vLLM's penalties on one row of logits ``(vocab,)``, in place: repetition over the
    prompt and the output, presence and frequency over the output."""
    vocab = logits.shape[0]
    output = torch.from_numpy(history.output).to(logits.device)
    counts = torch.bincount(output, minlength=vocab)[:vocab].to(logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        seen[torch.from_numpy(history.prompt).to(logits.device)] = True
        penalized = torch.where(
            logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
        )
        logits.copy_(torch.where(seen, penalized, logits))
    logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


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
