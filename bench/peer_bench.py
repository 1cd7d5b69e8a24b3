"""batchrun against its peers — vLLM (with automatic prefix caching) and transformers ``generate``
— side by side in one run, on the same generated workloads, model and machine.

    python bench/peer_bench.py --vllm-python /tmp/venv-vllm/bin/python
    python bench/peer_bench.py --rows 16 --workloads system --vllm-python ...   # a smoke run
    python bench/peer_bench.py --dtype float32 --rows 8 --max-tokens 8          # outputs must agree

A benchmark, not a test: it prints one table (and ``--json PATH``) and asserts nothing.
The model is a random-weight Llama built from a config (8 layers, hidden 512, 8 heads / 2 KV
heads, ~32M parameters; ``--layers 16`` for a deeper one) and saved with the bundled
tokenizer. Every row is greedy with EOS ignored, in shuffled file order, so every system
generates exactly the same number of tokens per row (checked: "tokens/row"). Each (workload,
system) pair runs in a fresh process (``bench/peer_systems.py``); vLLM in the Python given
with ``--vllm-python``, which has its own torch; a Python without ``vllm`` reports it
unavailable, with the reason, and the other systems still run. Prompts are passed as token
ids, so no system tokenizes.

Workloads: those of ``bench/workloads.py`` and ``pressure`` — the ``docs`` prompts with a KV
cache of ``--pressure-kv-memory`` for batchrun and vLLM (default: an eighth of what the rows
would hold with nothing shared), where an LRU prefix cache evicts prefixes it will need again.
``--kv-memory`` (default 2 GiB, more than these rows use) and ``--token-budget`` set the
other workloads' KV cache and tokens per step for batchrun and vLLM alike (vLLM:
``kv_cache_memory_bytes``, ``max_num_batched_tokens``; batchrun caps its cache at what the
rows can use); without ``--token-budget`` each uses its own default. (vLLM-CPU's own KV
default reserves 90% of the machine's memory and refuses to start when less is free.)

Columns: ``gen s`` is the generate phase only (weights loaded, KV cache allocated; batchrun's
planning included; vLLM's ``LLM.generate``); ``prompt computed`` the prompt positions the
system ran through the model (vLLM: prompt tokens less its ``num_cached_tokens``; ``generate``:
its padding included); ``limit s`` the compute limit of that system's work — positions
computed × 2 × the non-embedding parameters (the LM head only for output tokens; attention's
own products not counted, so a lower bound) ÷ a bf16 (or ``--dtype``) matmul rate timed here
with ``--threads`` threads; ``of limit`` = limit s ÷ gen s. ``batchrun ×`` is batchrun's speed
relative to that system (its seconds ÷ batchrun's). ``same`` counts the first ``--compare``
rows whose tokens equal batchrun's: expect all in float32; in bf16 a row's arithmetic depends
on its batch, so greedy outputs may part after a few tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from workloads import WORKLOADS, make_model, make_workload

HERE = Path(__file__).resolve().parent
SYSTEMS = ("batchrun", "vllm", "generate", "batchrun-torch")
CHOICES = (*WORKLOADS, "pressure")
COLUMNS = (
    ("workload", "<9"),
    ("system", "<15"),
    ("gen s", ">8"),
    ("out tok/s", ">10"),
    ("prompt tok", ">11"),
    ("prompt computed", ">16"),
    ("limit s", ">8"),
    ("of limit", ">9"),
    ("tokens/row", ">11"),
    ("same", ">6"),
    ("batchrun ×", ">11"),
)


def vllm_status(python: str, cwd: Path) -> str:
    """``vLLM <version>`` if ``vllm`` imports in ``python``, else ``vLLM unavailable: <why>``."""
    probe = "import vllm; print(vllm.__version__)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=600, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"vLLM unavailable: {python}: {exc}"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        return f"vLLM unavailable: `{python} -c 'import vllm'` failed: {lines[-1]}"
    return f"vLLM {done.stdout.strip().splitlines()[-1]}"


def matmul_tflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """A square ``dtype`` matmul timed for about ``seconds``: the rate the compute limit uses."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def model_facts(model_dir: Path) -> dict:
    """FLOPs per computed position (body) and per output token (LM head), KV bytes per token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    head = sum(n for name, n in sizes.items() if name.startswith("lm_head"))
    embed = sum(n for name, n in sizes.items() if "embed_tokens" in name)
    body = sum(sizes.values()) - head - embed
    head_dim = config.hidden_size // config.num_attention_heads
    return {
        "params": sum(sizes.values()),
        "body_flops": 2 * body,
        "head_flops": 2 * head,
        "kv_values_per_token": 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim,
    }


def write_job(folder: Path, workload: str, args, tokenizer) -> tuple[Path, list[list[int]], list[int]]:
    """The workload's prompts as token ids, in a file every system reads."""
    items = make_workload("docs" if workload == "pressure" else workload, args.rows, args.max_tokens)
    prompts = [tokenizer(text)["input_ids"] for text, _ in items]
    limits = [m for _, m in items]
    path = folder / f"{workload}.json"
    path.write_text(json.dumps({"prompts": prompts, "max_tokens": limits}))
    return path, prompts, limits


def run_system(system: str, python: str, job: Path, model: Path, args, kv_bytes: int | None) -> dict:
    """One system on one workload in a fresh process: its JSON result plus its outputs, or an error.

    The process starts in the job's folder, not the repository, whose ``kernels/`` folder would
    shadow the ``kernels`` package that transformers probes for inside vLLM."""
    out = job.with_suffix(f".{system}.out.json")
    command = [python, str(HERE / "peer_systems.py"), system, "--model", str(model), "--prompts", str(job)]
    command += ["--out", str(out), "--dtype", args.dtype, "--threads", str(args.threads)]
    command += ["--hf-batch", str(args.hf_batch)]
    if args.token_budget is not None:
        command += ["--token-budget", str(args.token_budget)]
    if kv_bytes is not None:
        command += ["--kv-bytes", str(kv_bytes)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=job.parent)
    if done.returncode != 0 or not out.exists():
        tail = done.stderr.strip().splitlines()[-3:] or [f"exit {done.returncode}"]
        return {"error": " | ".join(tail)}
    saved = json.loads(out.read_text())
    return saved["result"] | {"outputs": saved["outputs"]}


def size_bytes(text: str | None) -> int | None:
    """A ``--kv-memory`` size in bytes (a fraction of free memory is refused: vLLM takes bytes)."""
    from batchrun.core.sizes import parse_memory

    if text is None:
        return None
    size = parse_memory(text)
    if isinstance(size, float):
        raise SystemExit(f"error: give the KV size in bytes with a unit (256MiB), not a fraction: {text!r}")
    return size


def pressure_kv(prompts: list[list[int]], limits: list[int], facts: dict, args) -> int:
    """The KV-pressure case's cache: ``--pressure-kv-memory``, else an eighth of what the rows
    hold with nothing shared (at least two of the longest row, which vLLM needs to start)."""
    given = size_bytes(args.pressure_kv_memory)
    if given is not None:
        return given
    per_token = facts["kv_values_per_token"] * (4 if args.dtype == "float32" else 2)
    need = sum(len(p) + m for p, m in zip(prompts, limits, strict=True))
    longest = max(len(p) + m for p, m in zip(prompts, limits, strict=True))
    return per_token * max(need // 8, 2 * longest)


def describe(workload: str, system: str, r: dict, limits: list[int], base: dict | None, args) -> dict:
    """One table row (and the JSON record) for ``system``'s result ``r``."""
    cells = {"workload": workload, "system": system}
    if "error" in r:
        return cells | {"error": r["error"]}
    outputs, out_tokens = r.pop("outputs"), sum(limits)
    wrong = sum(len(o) != m for o, m in zip(outputs, limits, strict=True))
    limit_s = (r["computed_tokens"] * args.facts["body_flops"] + out_tokens * args.facts["head_flops"]) / (
        args.peak_tflops * 1e12
    )
    same = "-"
    if base is not None and system != "batchrun" and "outputs" in base:
        n = min(args.compare, len(outputs))
        same = f"{sum(a == b for a, b in zip(outputs[:n], base['outputs'][:n], strict=True))}/{n}"
    ratio = f"{r['seconds'] / base['seconds']:.2f}×" if base and system != "batchrun" else "-"
    r["output_tokens"] = out_tokens
    return cells | {
        "gen s": f"{r['seconds']:.2f}",
        "out tok/s": f"{out_tokens / r['seconds']:.1f}",
        "prompt tok": f"{args.prompt_tokens:,}",
        "prompt computed": f"{r['prompt_tokens_computed']:,}",
        "limit s": f"{limit_s:.2f}",
        "of limit": f"{limit_s / r['seconds']:.0%}",
        "tokens/row": "ok" if not wrong else f"{wrong} off",
        "same": same,
        "batchrun ×": ratio,
        "result": r,
    }


def print_row(cells: dict) -> None:
    if "error" in cells:
        print(f"{cells['workload']:<9}{cells['system']:<15} failed: {cells['error']}", flush=True)
        return
    print("".join(f"{cells[name]:{spec}}" for name, spec in COLUMNS), flush=True)


def run_workload(workload: str, systems, model: Path, folder: Path, tokenizer, kv_memory, args) -> list:
    """Every system on ``workload``, a table row each as it finishes; their records."""
    job, prompts, limits = write_job(folder, workload, args, tokenizer)
    args.prompt_tokens = sum(map(len, prompts))
    kv = kv_memory
    if workload == "pressure":
        kv = pressure_kv(prompts, limits, args.facts, args)
        print(f"pressure: a KV cache of {kv / 2**20:.1f} MiB for batchrun and vLLM", flush=True)
    records, base = [], None
    for system in systems:
        python = args.vllm_python if system == "vllm" else sys.executable
        result = run_system(system, python, job, model, args, kv)
        cells = describe(workload, system, dict(result), limits, base, args)
        if system == "batchrun" and "error" not in result:
            base = result
        print_row(cells)
        records.append(cells | {"kv_bytes": kv})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32, help="per row (mixed: 4× for a quarter)")
    parser.add_argument("--workloads", nargs="+", default=list(CHOICES), choices=CHOICES)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the generated model")
    parser.add_argument("--model", type=Path, help="a checkpoint folder instead of the generated model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="batchrun, generate")
    parser.add_argument("--token-budget", type=int, help="tokens per step, batchrun and vLLM")
    parser.add_argument("--kv-memory", default="2GiB", help="KV cache size for batchrun and vLLM")
    parser.add_argument("--pressure-kv-memory", help="KV cache size of the pressure workload")
    parser.add_argument("--hf-batch", type=int, default=32, help="generate's batch size")
    parser.add_argument("--vllm-python", default=sys.executable, help="a Python in which vllm imports")
    parser.add_argument("--compare", type=int, default=4, help="rows compared token for token")
    parser.add_argument("--json", type=Path, help="also write every result here")
    args = parser.parse_args()
    kv_memory = size_bytes(args.kv_memory)
    torch.set_num_threads(args.threads)
    from batchrun.core.checkpoint import open_checkpoint

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        systems = [name for name in SYSTEMS if name in args.systems]  # batchrun first: the base
        vllm = vllm_status(args.vllm_python, Path(tmp)) if "vllm" in systems else "vLLM not run"
        if "unavailable" in vllm:
            systems.remove("vllm")
        dtype = getattr(torch, args.dtype)
        model = args.model or make_model(
            Path(tmp) / "llama-peer",
            num_key_value_heads=2,
            intermediate_size=2048,
            num_hidden_layers=args.layers,
            dtype=dtype,
        )
        args.facts, args.peak_tflops = model_facts(model), matmul_tflops(dtype)
        tokenizer = open_checkpoint(model).tokenizer
        print(
            f"model {model.name} ({args.facts['params'] / 1e6:.0f}M params, {args.dtype}, CPU); "
            f"{args.rows} rows, max_tokens {args.max_tokens}; {args.threads} threads "
            f"(vLLM: its own); {args.dtype} matmul {args.peak_tflops * 1e3:.0f} GFLOP/s; "
            f"{vllm}"
        )
        print("".join(f"{name:{spec}}" for name, spec in COLUMNS))
        for workload in args.workloads:
            records += run_workload(workload, systems, model, Path(tmp), tokenizer, kv_memory, args)
    if args.json:
        summary = {"peak_tflops": args.peak_tflops, "vllm": vllm, "results": records}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
