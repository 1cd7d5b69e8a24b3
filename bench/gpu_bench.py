"""GPU benchmark: BatchLLM's workload shape on a 7-8B model shape, batchrun vs its ablations vs
transformers ``generate``, with MFU and attention bandwidth against the device's own peaks.

    python bench/gpu_bench.py                     # on one GPU: Llama-3.1-8B shape, bf16
    python bench/gpu_bench.py --deadline-s 300 --json out.json --logs logs/   # within a budget
    python bench/gpu_bench.py --shape qwen2.5-7b  # Qwen2.5-7B's shape instead
    python bench/gpu_bench.py --smoke             # a tiny shape on the CPU: checks the harness

A benchmark, not a test: it prints one table (and ``--json PATH``) and asserts nothing.
Nothing is downloaded: the model is built from a config with random bf16 weights, directly
on the device, and the bundled tokenizer only decodes. Prompts are token ids.

Workloads (BatchLLM's microbenchmark): groups of 16 prompts sharing a 2,000-token context,
each with its own 200-token suffix, 100 output tokens, EOS ignored, rows shuffled; at 512 and
2,048 prompts; and ``unique``: 512 prompts of 2,200 tokens sharing nothing. Systems, each in
a fresh process (its own peak memory):

* ``batchrun`` — the plan, ``--attention-backend auto``;
* ``batchrun plain`` — ``--no-prefix-sharing --order input``;
* ``batchrun torch`` — the torch reference backend (512 prompts only);
* ``batchrun eager`` — ``--no-cuda-graphs``: every step launched eagerly (512 prompts only);
* ``generate`` — transformers ``generate``, left-padded batches, SDPA, 128 prompts a batch
  (``--hf-batch``; halved on out-of-memory).

Rows run most telling first (``PRIORITY``); with ``--deadline-s`` a row that cannot finish in
time is not started, and ``--json`` is rewritten after every row. Each batchrun row first
makes an untimed run of 32 prompts, which compiles the Triton kernels (cached on disk for
later rows) and warms the allocator. Every row's stderr is kept under ``--logs``.

MFU counts 2 FLOPs per non-embedding parameter per token actually computed (prompt tokens
after sharing + output tokens) against a bf16 matmul timed here; decode attention bandwidth
is K/V bytes read per second in a decode-only step against a device copy timed here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "sample_jobs" / "models" / "tiny-llama"
SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "llama3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=32000,
    ),
    "smoke": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=2048,
    ),
}
WORKLOADS = {  # groups x members, shared tokens, own tokens, output tokens
    "batchllm-512": (32, 16, 2000, 200, 100),
    "batchllm-2048": (128, 16, 2000, 200, 100),
    "unique-512": (512, 1, 0, 2200, 100),
    "smoke": (2, 4, 40, 8, 4),
}
SYSTEMS = ("batchrun", "batchrun plain", "batchrun torch", "batchrun eager", "generate")
ONLY_512 = ("batchrun torch", "batchrun eager")  # ablations run on the 512-prompt workload


def build_model(shape: str, device: torch.device, dtype: torch.dtype, attention: str):
    """A random-weight Llama-architecture model of ``shape``, built on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    return model.eval()


def workload(name: str, vocab: int, seed: int = 0) -> tuple[list[list[int]], int]:
    """Token-id prompts in shuffled file order, and the output length."""
    groups, members, shared, own, out = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(groups):
        context = rng.integers(3, vocab, shared).tolist()
        prompts += [context + rng.integers(3, vocab, own).tolist() for _ in range(members)]
    random.Random(seed).shuffle(prompts)
    return prompts, out


def run_batchrun(
    model, prompts, out_tokens, backend: str, sharing: bool, budget: int, cuda_graphs: bool = True
) -> dict:
    from batchrun.core.checkpoint import open_checkpoint
    from batchrun.core.engine.config import EngineConfig
    from batchrun.core.engine.engine import build_engine
    from batchrun.core.job.requests import make_requests
    from batchrun.core.job.rows import Row
    from batchrun.core.params import SamplingParams
    from batchrun.core.planner.plan import build_plan
    from batchrun.core.planner.prompt_tokens import PromptTokens
    from batchrun.core.runner.model_loader import LoadedModel

    device = next(model.parameters()).device
    tokenizer = open_checkpoint(TOKENIZER).tokenizer
    loaded = LoadedModel("bench", TOKENIZER, model, tokenizer, device, model.dtype, (2,), 8192)
    config = EngineConfig(token_budget=budget, attention_backend=backend, cuda_graphs=cuda_graphs)
    sync(device)
    start = time.perf_counter()
    tokens = PromptTokens.from_lists(prompts)
    limits = np.full(len(prompts), out_tokens)
    order = "plan" if sharing else "input"
    plan = build_plan(
        tokens, np.ones(len(prompts), bool), limits, config.block_size, sharing=sharing, order=order
    )
    rows = [
        Row(i, str(i), f"row {i}", params=SamplingParams(max_tokens=out_tokens, ignore_eos=True))
        for i in range(len(prompts))
    ]
    engine = build_engine(loaded, config, useful_tokens=int(tokens.lengths.sum() + limits.sum()))
    for _ in engine.generate(make_requests(rows, tokens, plan, job_seed=0, sample_sharing=sharing)):
        pass
    sync(device)
    seconds = time.perf_counter() - start
    stats = engine.stats
    bytes_per_block = engine.info.kv_cache_bytes // max(engine.info.num_blocks, 1)
    return {
        "seconds": seconds,
        "loop_s": stats.seconds,  # the generation loop alone (no planning, no engine build)
        "computed_tokens": stats.prefill_tokens + stats.decode_tokens,
        "prompt_tokens_computed": stats.prefill_tokens,
        "steps": stats.steps,
        "step_ms": 1e3 * stats.seconds / max(stats.steps, 1),
        "preemptions": stats.preemptions,
        "backend": engine.info.attention_backend,
        "backend_choice": engine.info.attention_backend_choice,  # auto's reason, CUDA graphs or why not
        "graph_steps": stats.graph_steps,
        "cuda_graphs": stats.cuda_graphs,
        "kv_pool_gib": engine.info.kv_cache_bytes / 2**30,
        "kv_peak_gib": stats.peak_blocks * bytes_per_block / 2**30,
    }


def run_generate(model, prompts, out_tokens, batch: int) -> dict:
    device = next(model.parameters()).device
    sync(device)
    start = time.perf_counter()
    while True:
        try:
            for i in range(0, len(prompts), batch):
                chunk = prompts[i : i + batch]
                width = max(map(len, chunk))
                ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                with torch.inference_mode():
                    model.generate(
                        ids,
                        attention_mask=mask,
                        max_new_tokens=out_tokens,
                        min_new_tokens=out_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )
            break
        except torch.OutOfMemoryError:
            batch //= 2
            torch.cuda.empty_cache()
            if batch == 0:
                raise
            start = time.perf_counter()
    sync(device)
    computed = sum(map(len, prompts)) + len(prompts) * out_tokens
    return {
        "seconds": time.perf_counter() - start,
        "computed_tokens": computed,
        "prompt_tokens_computed": sum(map(len, prompts)),
        "batch": batch,
    }


def child(args) -> None:
    """One system on one workload in this process; print JSON."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    system = args.system
    attention = "sdpa" if system == "generate" else _batchrun_attention()
    model = build_model(args.shape, device, dtype, attention)
    prompts, out_tokens = workload(
        args.workload, SHAPES[args.shape]["vocab_size"] if args.shape == "smoke" else 2048
    )
    if system == "generate":
        result = run_generate(model, prompts, out_tokens, args.hf_batch)
    else:
        backend = "torch" if system == "batchrun torch" else "auto"
        sharing, graphs = system != "batchrun plain", system != "batchrun eager"
        options = (backend, sharing, args.token_budget, graphs)
        # Untimed: compiles the Triton kernels (cached on disk for later children) and warms
        # the allocator, so the timed run measures batchrun, not the compiler.
        run_batchrun(model, prompts[:32], min(out_tokens, 4), *options)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result = run_batchrun(model, prompts, out_tokens, *options)
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    result |= {"prompts": len(prompts), "output_tokens": len(prompts) * out_tokens, "params": params}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result))


def _batchrun_attention() -> str:
    from batchrun.core.runner.attention_hook import register_attention

    return register_attention()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: torch.device, n: int) -> float:
    """A timed square matmul in bf16 (fp32 on CPU): the device's reachable FLOP rate."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 50  # long enough for the clocks to settle
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def copy_gbps(device: torch.device, nbytes: int) -> float:
    """A timed device copy: the memory bandwidth attention is compared with (read + write)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    for _ in range(2):
        src.clone()
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        src.clone()
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - start) / 1e9


def decode_attention_gbps(device: torch.device, backend_name: str, seqs: int, keys: int) -> float:
    """K/V bytes read per second by one decode-only step's attention (8 KV heads, dim 128)."""
    from batchrun.core.runner.input_batch import StepInputs
    from batchrun.core.runner.model_runner import attention_metadata
    from batchrun.kernels import get_backend

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    block, kv_heads, dim = 16, 8, 128
    blocks_per_seq = -(-keys // block)
    num_blocks = seqs * blocks_per_seq
    k = torch.randn(num_blocks + 1, block, kv_heads, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(seqs, kv_heads * 4, dim, device=device, dtype=dtype)
    tables = np.arange(num_blocks, dtype=np.int32).reshape(seqs, blocks_per_seq)
    inputs = StepInputs(
        req_ids=tuple(range(seqs)),
        input_ids=np.zeros(seqs, np.int64),
        positions=np.full(seqs, keys - 1),
        slot_mapping=np.zeros(seqs, np.int64),
        cu_seqlens_q=np.arange(seqs + 1, dtype=np.int32),
        seq_lens=np.full(seqs, keys, np.int32),
        block_tables=tables,
        group_keys=np.full(seqs, -1),
        group_prefix_lens=np.zeros(seqs, np.int64),
        sample_rows=np.arange(seqs),
        sample_req_ids=(),
    )
    backend = get_backend(backend_name)
    state = backend.build(
        attention_metadata(inputs, num_blocks, block, lambda a: torch.from_numpy(a).to(device))
    )
    backend.forward(state, q, k, v, dim**-0.5)
    sync(device)
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        backend.forward(state, q, k, v, dim**-0.5)
    sync(device)
    return 2 * seqs * keys * kv_heads * dim * k.element_size() * reps / (time.perf_counter() - start) / 1e9


# Rows in the order they run: the comparisons that matter most first, so a deadline cuts the
# least telling ones (batchrun vs generate and graphs vs eager at 512 prompts lead).
PRIORITY = (
    ("batchllm-512", "batchrun"),
    ("batchllm-512", "generate"),
    ("batchllm-512", "batchrun eager"),
    ("batchllm-512", "batchrun plain"),
    ("batchllm-2048", "batchrun"),
    ("batchllm-512", "batchrun torch"),
    ("unique-512", "batchrun"),
    ("unique-512", "generate"),
    ("batchllm-2048", "generate"),
    ("batchllm-2048", "batchrun plain"),
    ("unique-512", "batchrun plain"),
)
MIN_CHILD_S = 45  # a row is not started with less time left than this


def planned_rows(workloads: list[str]) -> list[tuple[str, str]]:
    if workloads == ["smoke"]:
        return [("smoke", system) for system in SYSTEMS]
    return [(name, system) for name, system in PRIORITY if name in workloads]


def device_figures(device: torch.device) -> dict:
    """The device's own peaks, and decode attention against them; an error is printed, not fatal."""
    figures: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    figures["versions"] = {"torch": torch.__version__}
    try:
        import transformers
        import triton

        figures["versions"] |= {"transformers": transformers.__version__, "triton": triton.__version__}
        figures["matmul_tflops"] = matmul_tflops(device, 8192 if device.type == "cuda" else 512)
        figures["copy_gbps"] = copy_gbps(device, 2**30 if device.type == "cuda" else 2**24)
    except Exception as error:  # noqa: BLE001 - report and go on: the rows still run
        print(f"device figures failed: {type(error).__name__}: {error}", flush=True)
    print(
        f"device {figures['device']}: matmul {figures.get('matmul_tflops', float('nan')):.1f} TFLOP/s, "
        f"copy {figures.get('copy_gbps', float('nan')):.0f} GB/s",
        flush=True,
    )
    seqs, keys = (256, 2200) if device.type == "cuda" else (8, 64)
    for backend in ("triton", "torch") if device.type == "cuda" else ("torch",):
        try:
            gbps = decode_attention_gbps(device, backend, seqs, keys)
        except Exception as error:  # noqa: BLE001
            print(f"decode attention ({backend}) failed: {type(error).__name__}: {error}", flush=True)
            continue
        figures[f"decode_attention_gbps_{backend}"] = gbps
        share = gbps / figures["copy_gbps"] if "copy_gbps" in figures else float("nan")
        print(
            f"decode attention ({backend}, {seqs} seqs x {keys} keys): {gbps:.0f} GB/s = {share:.0%} of copy",
            flush=True,
        )
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the children size their KV caches from free memory
    return figures


def run_child(args, name: str, system: str, timeout_s: float | None) -> dict:
    """One row in a fresh process (its own peak memory); its stderr kept under ``--logs``."""
    command = [sys.executable, __file__, "--system", system, "--workload", name, "--shape", args.shape]
    command += ["--device", args.device, "--token-budget", str(args.token_budget)]
    command += ["--hf-batch", str(args.hf_batch)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        stdout, stderr, failed = done.stdout, done.stderr, done.returncode != 0
    except subprocess.TimeoutExpired as expired:
        stdout, stderr, failed = "", f"{expired.stderr or ''}\ntimed out after {timeout_s:.0f} s", True
        stderr = stderr if isinstance(stderr, str) else stderr.decode(errors="replace")
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        (args.logs / f"{name}--{system.replace(' ', '-')}.log").write_text(stderr)
    lines = stdout.strip().splitlines()
    if failed or not lines:
        last = stderr.strip().splitlines()[-1:] or ["no output"]
        return {"workload": name, "system": system, "error": last[0]}
    return json.loads(lines[-1]) | {"workload": name, "system": system}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3.1-8b", choices=list(SHAPES))
    parser.add_argument("--workloads", nargs="+", default=["batchllm-512", "batchllm-2048", "unique-512"])
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--hf-batch", type=int, default=128, help="generate's first batch (halved on OOM)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: check the harness")
    parser.add_argument("--json", type=Path, help="also write every result here (rewritten after each row)")
    parser.add_argument("--logs", type=Path, help="keep each row's stderr in this folder")
    parser.add_argument("--deadline-s", type=float, help="start no row that cannot finish within this")
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.system:
        return child(args)
    if args.smoke:
        args.shape, args.workloads, args.device, args.token_budget, args.hf_batch = (
            "smoke",
            ["smoke"],
            "cpu",
            64,
            8,
        )
    started = time.monotonic()
    figures = device_figures(torch.device(args.device))
    peak = figures.get("matmul_tflops", float("nan"))
    results = []
    columns = ("s", "prompts/s", "tok/s", "prompt computed", "steps", "graphed", "ms/step", "MFU", "backend")
    widths = (8, 10, 9, 16, 6, 7, 8, 6, 9)
    header = " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    print(f"{'workload':<14} {'system':<15} {header}", flush=True)
    for name, system in planned_rows(args.workloads):
        left = None if args.deadline_s is None else args.deadline_s - (time.monotonic() - started)
        if left is not None and left < MIN_CHILD_S:
            print(f"{name:<14} {system:<15} not run: {left:.0f} s left of --deadline-s", flush=True)
            results.append({"workload": name, "system": system, "error": "deadline"})
            continue
        r = run_child(args, name, system, left)
        results.append(r)
        if "error" in r:
            print(f"{name:<14} {system:<15} failed: {r['error']}", flush=True)
        else:
            r["prompts_per_s"] = r["prompts"] / r["seconds"]
            r["mfu"] = 2 * r["params"] * r["computed_tokens"] / r["seconds"] / (peak * 1e12)
            label = r.get("backend", f"b={r.get('batch', '-')}")
            print(
                f"{name:<14} {system:<15} {r['seconds']:8.1f} {r['prompts_per_s']:10.2f} "
                f"{r['output_tokens'] / r['seconds']:9.0f} {r['prompt_tokens_computed']:16,} "
                f"{r.get('steps', '-'):>6} {r.get('graph_steps', '-'):>7} "
                f"{r.get('step_ms', float('nan')):8.1f} {r['mfu']:6.1%} {label:>9}",
                flush=True,
            )
        if args.json:  # after every row: a deadline or a crash keeps what ran
            partial = args.json.with_suffix(".tmp")
            partial.write_text(json.dumps(figures | {"results": results}, indent=2))
            os.replace(partial, args.json)


if __name__ == "__main__":
    main()
