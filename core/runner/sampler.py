"""Next-token selection: greedy, or temperature / top-k / top-p with a per-row generator.

Each sampled row draws from its own ``torch.Generator``, seeded from the row, so a row's
output does not depend on which other rows share its step.
"""

from __future__ import annotations

import hashlib

import torch

from batchrun.core.sched.request import Request


def row_seed(job_seed: int, row_id: str) -> int:
    """A stable 63-bit seed for a row without its own ``seed``: from the job seed and row id."""
    digest = hashlib.blake2b(f"{job_seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """Pick one token per row of ``logits`` ``(S, vocab)`` for the matching request."""
    tokens = torch.argmax(logits, dim=-1).tolist()
    for i, request in enumerate(requests):
        if not request.params.greedy:
            tokens[i] = _sample_one(logits[i], request)
    return tokens


def _sample_one(logits: torch.Tensor, request: Request) -> int:
    params = request.params
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
    return int(torch.multinomial(probs, 1, generator=request.generator).item())


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
