"""End-to-end scale: ``batchrun plan`` and ``batchrun run --max-tokens 1`` on N chat rows.

A benchmark, not a test. Rows have the shape of a document-QA job: one shared system
prompt ▸ one of 500 documents (~1,200 characters) ▸ a short question, as ``messages``,
written as JSONL in shuffled order. Each command runs as its own process with the bundled
model; the job's report (``plan --json`` seconds, the run report's phases) gives the
seconds per phase, and the process's peak RSS (``wait4``) is compared with the size of
the int32 token array.

    python bench/scale_bench.py --sizes 10000 100000      # ~minutes on 2 cores
    python bench/scale_bench.py --sizes 1000000           # tens of minutes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = 500
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no more "
    "data model system value table report market river city energy policy process result study"
).split()
SYSTEM = (
    "You are a careful assistant for a research team. Answer the question about the document "
    "below in one or two sentences, quoting the document where you can. If the document does "
    "not contain the answer, say so plainly and do not guess."
)


def document(rng: random.Random, k: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(180, 240))]
    return f"Document {k}: " + " ".join(words) + "."


def write_rows(path: Path, num_rows: int, seed: int = 0) -> None:
    """``num_rows`` chat rows in shuffled order: shared system prompt ▸ one of 500 documents
    ▸ a question of 6-14 words."""
    rng = random.Random(seed)
    docs = [document(rng, k) for k in range(DOCUMENTS)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_rows):
            doc = docs[rng.randrange(DOCUMENTS)]
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "?"
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{doc}\n\nQuestion {i}: {question}"},
            ]
            f.write(json.dumps({"id": f"q{i}", "messages": messages}) + "\n")


def timed(cmd: list[str], log: Path) -> tuple[float, float, str]:
    """Run ``cmd`` (stderr to ``log``): wall seconds, peak RSS in GiB, stdout."""
    start = time.perf_counter()
    with open(log, "w") as err, open(log.with_suffix(".stdout"), "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 3):
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss / 2**20, log.with_suffix(".stdout").read_text()


def bench(num_rows: int, folder: Path, run: bool) -> dict:
    rows = folder / f"rows{num_rows}.jsonl"
    start = time.perf_counter()
    write_rows(rows, num_rows)
    result: dict = {"rows": num_rows, "generate_s": time.perf_counter() - start, "bytes": rows.stat().st_size}
    result["cpus"], result["load_before"] = os.cpu_count(), os.getloadavg()[0]  # a shared machine shows here
    cli = [sys.executable, "-m", "batchrun.cli.main"]
    # cold plan (tokenizes and leaves the ids beside the default output), then a warm one
    for name in ("plan", "plan_again"):
        seconds, rss, stdout = timed([*cli, "plan", str(rows), "--json"], folder / f"{name}{num_rows}.log")
        doc = json.loads(stdout)
        result[name] = {"wall_s": seconds, "peak_rss_gib": rss, "phases": doc["seconds"]}
        result["prompt_tokens"] = doc["prompt_tokens"]
        result["plan_json_bytes"] = len(stdout)
        result["saving"] = doc["saving"]
    result["token_array_gib"] = result["prompt_tokens"] * 4 / 2**30
    if run:  # after plan: the run memory-maps the plan's ids
        cmd = [*cli, "run", str(rows), "--max-tokens", "1", "--log-every", "60"]
        seconds, rss, _ = timed(cmd, folder / f"run{num_rows}.log")
        report = json.loads((folder / f".rows{num_rows}.out.jsonl.report.json").read_text())
        result["run"] = {"wall_s": seconds, "peak_rss_gib": rss, "phases": report.get("seconds")}
        result["run"]["attention"] = (report.get("run") or {}).get("attention")
    result["load_after"] = os.getloadavg()[0]
    return result


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--run-sizes", type=int, nargs="*", default=None, help="sizes also run (default all)")
    parser.add_argument("--folder", type=Path, default=None, help="where rows go (default: a temp folder)")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="batchrun-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        run = args.run_sizes is None or n in args.run_sizes
        result = bench(n, folder, run)
        print(json.dumps(result), flush=True)
        print(table_row(result), flush=True)


def table_row(r: dict) -> str:
    plan, again = r["plan"], r["plan_again"]
    tok = plan["phases"].get("tokenize", 0.0)
    cells = [
        f"{r['rows']:,}",
        f"{r['prompt_tokens'] / 1e6:,.1f} M",
        f"{r['token_array_gib']:.2f}",
        f"{plan['phases'].get('read', 0):.1f} / {tok:.1f} / {plan['phases'].get('plan', 0):.1f} / "
        f"{plan['phases'].get('lru baseline', 0):.1f}",
        f"{r['rows'] / tok:,.0f} rows/s, {r['prompt_tokens'] / tok / 1e6:.2f} M tok/s" if tok else "-",
        f"{plan['wall_s']:.1f}",
        f"{plan['peak_rss_gib']:.2f}",
        f"{again['wall_s']:.1f} (tokenize {again['phases'].get('tokenize', 0):.2f})",
    ]
    if "run" in r:
        run = r["run"]
        phases = run["phases"] or {}
        cells += [
            f"{run['wall_s']:.1f}",
            f"{r['rows'] / run['wall_s']:,.0f}",
            " / ".join(f"{phases.get(name, 0):.1f}" for name in ("read", "tokenize", "generate", "write")),
            f"{run['peak_rss_gib']:.2f}",
        ]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
