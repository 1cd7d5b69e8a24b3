"""How the planner scales: seconds and peak memory to plan 10k, 100k and 1M prompts.

A benchmark, not a test. Batches are synthetic and pre-tokenized, with the sharing of a
real document-QA job: one of 20 system prompts (50-150 tokens) ▸ one of n/5 documents
(200-400 tokens, each asked 5 questions) ▸ a question (50-150 tokens); ~500 tokens per
prompt; rows shuffled. Each size is planned in a fresh process that loads the token array
and reports its own peak RSS (the token array included, the batch generation not);
"planner extra" is what planning adds on top of the loaded array.
Tokenization throughput (the bundled fast tokenizer, batched) is measured separately.

    python bench/plan_scale.py                  # 10k, 100k, 1M
    python bench/plan_scale.py --sizes 10000    # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PROMPTS, QUESTIONS_PER_DOC, VOCAB = 20, 5, 32000
CHUNK_ROWS = 50_000


def synthetic_batch(num_rows: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write tokens.npy (int32) and offsets.npy (int64) for ``num_rows`` prompts, chunk by chunk."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, VOCAB, rng.integers(50, 151), dtype=np.int32) for _ in range(SYSTEM_PROMPTS)]
    num_docs = -(-num_rows // QUESTIONS_PER_DOC)
    doc_lengths = rng.integers(200, 401, num_docs)
    doc_seeds = rng.integers(0, 2**63, num_docs)
    doc_system = rng.integers(0, SYSTEM_PROMPTS, num_docs)
    row_doc = rng.permutation(np.arange(num_rows) // QUESTIONS_PER_DOC)  # shuffled rows
    question_lengths = rng.integers(50, 151, num_rows)
    system_lengths = np.array([len(s) for s in systems])
    lengths = system_lengths[doc_system[row_doc]] + doc_lengths[row_doc] + question_lengths
    offsets = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.lib.format.open_memmap(folder / "tokens.npy", "w+", np.int32, (int(offsets[-1]),))
    for lo in range(0, num_rows, CHUNK_ROWS):
        parts = []
        for r in range(lo, min(lo + CHUNK_ROWS, num_rows)):
            d = row_doc[r]
            doc = np.random.default_rng(doc_seeds[d]).integers(0, VOCAB, doc_lengths[d], dtype=np.int32)
            question = rng.integers(0, VOCAB, question_lengths[r], dtype=np.int32)
            parts += [systems[doc_system[d]], doc, question]
        chunk = np.concatenate(parts)
        tokens[offsets[lo] : offsets[lo] + len(chunk)] = chunk
    tokens.flush()
    del tokens
    np.save(folder / "offsets.npy", offsets)
    return folder / "tokens.npy", folder / "offsets.npy"


def plan_in_this_process(tokens_file: str, offsets_file: str, block_size: int) -> dict:
    """Load a batch, plan it, and report times and peak RSS (run in a fresh child process)."""
    from batchrun.core.planner.plan import build_plan
    from batchrun.core.planner.prompt_tokens import PromptTokens

    prompts = PromptTokens(np.load(tokens_file), np.load(offsets_file))
    loaded = peak_rss()
    runnable = np.ones(len(prompts), dtype=bool)
    expected = np.full(len(prompts), 256, dtype=np.int64)
    start = time.perf_counter()
    plan = build_plan(prompts, runnable, expected, block_size)
    seconds = time.perf_counter() - start
    return {
        "rows": len(prompts),
        "tokens": prompts.num_tokens,
        "token_array_bytes": prompts.tokens.nbytes + prompts.offsets.nbytes,
        "seconds": seconds,
        "loaded_rss": loaded,
        "peak_rss": peak_rss(),
        "saving": plan.summary.saving,
        "segments": plan.summary.shared_segments,
    }


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def tokenization_throughput(num_rows: int = 20_000) -> tuple[float, float]:
    """Rows/s and tokens/s of batched fast tokenization with the bundled tokenizer."""
    from batchrun.core.checkpoint import open_checkpoint
    from batchrun.core.job.rows import Row
    from batchrun.core.job.tokenize import tokenize_rows

    tokenizer = open_checkpoint(REPO / "sample_jobs" / "models" / "tiny-llama").tokenizer
    words = "the harbour lighthouse was built from local granite and its lamp burned paraffin".split()
    rng = np.random.default_rng(0)
    rows = [
        Row(index=i, id=str(i), location=f"row {i}", prompt=" ".join(rng.choice(words, 300)))
        for i in range(num_rows)
    ]
    start = time.perf_counter()
    prompts = tokenize_rows(rows, tokenizer)
    seconds = time.perf_counter() - start
    return num_rows / seconds, prompts.num_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(plan_in_this_process(*args.child, args.block_size)))
        return

    gib = 2**30
    print(
        f"{'rows':>9} {'tokens':>13} {'array GiB':>9} {'plan s':>7} {'peak RSS GiB':>12} "
        f"{'peak/array':>10} {'planner extra/array':>19} {'saving':>7}"
    )
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            files = synthetic_batch(size, Path(tmp))
            made = time.perf_counter() - start
            child = [sys.executable, __file__, "--child", *map(str, files)]
            child += ["--block-size", str(args.block_size)]
            r = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
        array = r["token_array_bytes"]
        print(
            f"{r['rows']:>9,} {r['tokens']:>13,} {array / gib:>9.2f} {r['seconds']:>7.2f} "
            f"{r['peak_rss'] / gib:>12.2f} {r['peak_rss'] / array:>10.2f} "
            f"{(r['peak_rss'] - r['loaded_rss']) / array:>19.2f} {r['saving']:>7.1%}"
            f"   (batch generated in {made:.0f} s)",
            flush=True,
        )
    rows_s, tokens_s = tokenization_throughput()
    print(
        f"tokenization (bundled fast tokenizer, batches of 1024): "
        f"{rows_s:,.0f} rows/s, {tokens_s:,.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
