"""Next-token selection for one step: greedy rows in one argmax; sampled rows (temperature,
top-k, top-p) each with a generator seeded from the request's seed and the token's index.

Seeding by ``(seed, k)`` for output token ``k`` makes a sample depend on nothing but the
row: not on which rows share its step, not on a preemption, not on which worker runs it.
"""

from __future__ import annotations

import torch

from batchrun.core.params import SamplingParams

_MASK64 = (1 << 64) - 1


def token_seed(seed: int, index: int) -> int:
    """A 63-bit seed for output token ``index`` of a request seeded ``seed`` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def sample(
    logits: torch.Tensor,  # (R, vocab) float32
    params: list[SamplingParams],
    seeds: list[int | None],
    output_lens: list[int],  # tokens each request has output before this one
) -> list[int]:
    """One token per row of ``logits``."""
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
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


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
