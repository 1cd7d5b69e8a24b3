"""Engine throughput vs transformers ``generate``, side by side on one model and machine.

    python bench/engine_bench.py                       # bundled tiny model, CPU
    python bench/engine_bench.py --model PATH --rows 256 --max-tokens 64

Workload: ``--rows`` prompts built like a document-QA job (one system prompt, documents
× questions, shuffled), each generating exactly ``--max-tokens`` tokens (EOS ignored, so
both sides do the same work). Baseline: ``generate`` in file order, left-padded batches
of ``--hf-batch`` rows. A benchmark, not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from batchrun.core.config import EngineConfig
from batchrun.core.engine import build_engine
from batchrun.core.model_loader import load_model
from batchrun.core.params import SamplingParams
from batchrun.core.request import Request

BUNDLED = Path(__file__).resolve().parents[1] / "sample_jobs" / "models" / "tiny-llama"
SYSTEM = "You are a careful analyst. Answer only from the document, in one or two sentences. " * 3
WORDS = "granite harbour lamp keeper ferry strait orchard frost blossom bakery rye starter flour".split()


def workload(tokenizer, rows: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(120)) for _ in range(max(rows // 8, 1))]
    texts = [f"{SYSTEM}\nDocument: {docs[i % len(docs)]}\nQuestion {i}: what happened?" for i in range(rows)]
    rng.shuffle(texts)
    return [tokenizer(t)["input_ids"] for t in texts]


def bench_hf(path: Path, prompts: list[list[int]], max_tokens: int, batch: int, pad_id: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        width = max(map(len, group))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
    return time.perf_counter() - start


def bench_batchrun(
    path: Path, prompts: list[list[int]], max_tokens: int, token_budget: int
) -> tuple[float, object]:
    loaded = load_model(path, device="cpu", dtype="float32")
    useful = sum(len(p) + max_tokens for p in prompts)  # as `batchrun run` caps the pool
    engine = build_engine(loaded, EngineConfig(token_budget=token_budget), useful_tokens=useful)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for _ in engine.generate(Request(i, p, params) for i, p in enumerate(prompts)):
        pass
    return time.perf_counter() - start, engine.stats


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=2048)
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    prompts = workload(loaded.tokenizer, args.rows)
    prompt_tokens = sum(map(len, prompts))
    output_tokens = args.rows * args.max_tokens
    pad_id = loaded.tokenizer.pad_token_id or 0

    hf_s = bench_hf(args.model, prompts, args.max_tokens, args.hf_batch, pad_id)
    br_s, stats = bench_batchrun(args.model, prompts, args.max_tokens, args.token_budget)

    print(
        f"model {args.model.name}, {args.rows} rows, {prompt_tokens} prompt tokens, "
        f"{args.max_tokens} output tokens each, {torch.get_num_threads()} CPU threads"
    )
    print(f"{'system':<38}{'seconds':>9}{'out tok/s':>11}{'total tok/s':>13}{'vs generate':>13}")
    for name, seconds in (
        (f"transformers generate (batch {args.hf_batch})", hf_s),
        ("batchrun engine", br_s),
    ):
        print(
            f"{name:<38}{seconds:>9.2f}{output_tokens / seconds:>11.1f}"
            f"{(prompt_tokens + output_tokens) / seconds:>13.1f}{hf_s / seconds:>12.2f}x"
        )
    print(
        f"batchrun: {stats.steps} steps, {stats.mean_tokens_per_step:.1f} tokens/step, "
        f"peak KV {stats.peak_blocks} blocks; peak RSS {peak_rss_mib():.0f} MiB"
    )


if __name__ == "__main__":
    main()
