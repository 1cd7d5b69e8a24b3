"""One system of ``bench/peer_bench.py`` on one workload, in this process; prints one JSON line.

    python bench/peer_systems.py SYSTEM --model DIR --prompts FILE --out FILE ...

SYSTEM is batchrun, batchrun-torch (the torch reference attention), generate or vllm. Run by
``peer_bench.py``, each time in a fresh process; ``vllm`` in the Python given with
``--vllm-python`` (its own virtualenv and torch), so this file imports nothing but the standard
library at the top. The prompts file is JSON ``{"prompts": [[token id, ...], ...],
"max_tokens": [...]}``; every system is greedy with EOS ignored, so row i generates exactly
``max_tokens[i]`` tokens. ``--out`` receives JSON ``{"result": {...}, "outputs": [[token id,
...], ...]}`` (outputs in row order; the result is also printed). The result has ``seconds``
(the generate phase only: after the weights are loaded and the KV cache is allocated),
``prompt_tokens_computed`` and ``computed_tokens`` (positions the system ran through the
model), and facts about the run. Run it from a folder other than the repository root: the
root's ``kernels/`` shadows the ``kernels`` package that transformers probes for inside vLLM.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run_batchrun(
    args, prompts: list[list[int]], limits: list[int], attention_backend: str = "auto"
) -> tuple[dict, list[list[int]]]:
    """batchrun's engine through its Python API: plan (timed), then every row through the engine."""
    import numpy as np

    from batchrun.core.engine.config import EngineConfig
    from batchrun.core.engine.engine import build_engine
    from batchrun.core.job.requests import make_requests
    from batchrun.core.job.rows import Row
    from batchrun.core.params import SamplingParams
    from batchrun.core.planner.plan import build_plan
    from batchrun.core.planner.prompt_tokens import PromptTokens
    from batchrun.core.runner.model_loader import load_model

    loaded = load_model(args.model, device="cpu", dtype=args.dtype)
    options = {} if args.token_budget is None else {"token_budget": args.token_budget}
    config = EngineConfig(kv_cache_bytes=args.kv_bytes, attention_backend=attention_backend, **options)
    tokens = PromptTokens.from_lists(prompts)
    max_tokens = np.array(limits)
    engine = build_engine(loaded, config, useful_tokens=int(tokens.lengths.sum() + max_tokens.sum()))
    rows = [
        Row(i, str(i), f"row {i}", params=SamplingParams(max_tokens=m, ignore_eos=True))
        for i, m in enumerate(limits)
    ]
    start = time.perf_counter()  # planning is part of batchrun's generate phase
    runnable = np.ones(len(prompts), dtype=bool)
    plan = build_plan(tokens, runnable, max_tokens, config.block_size, sharing=True, order="plan")
    outputs: list[list[int]] = [[] for _ in prompts]
    for completion in engine.generate(make_requests(rows, tokens, plan, job_seed=0, sample_sharing=True)):
        if completion.error:
            raise RuntimeError(f"row {completion.row}: {completion.error}")
        outputs[completion.row] = list(completion.token_ids)
    seconds = time.perf_counter() - start
    stats, info = engine.stats, engine.info
    result = {
        "seconds": seconds,
        "prompt_tokens_computed": stats.prefill_tokens,
        "steps": stats.steps,
        "preemptions": stats.preemptions,
        "kv_mib": info.kv_cache_bytes / 2**20,
        "token_budget": info.token_budget,
        "attention": info.attention_backend,
    }
    return result, outputs


def run_generate(args, prompts: list[list[int]], limits: list[int]) -> tuple[dict, list[list[int]]]:
    """transformers ``generate``: left-padded batches of ``--hf-batch`` in file order (static
    batching: a batch runs until its longest row is done, and computes its padding)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").eval()
    pad = model.config.pad_token_id or 0
    model.generation_config.eos_token_id = None  # not merged back into the greedy config below
    outputs: list[list[int]] = []
    prompt_computed = decode_computed = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), args.hf_batch):
        group, most = prompts[i : i + args.hf_batch], max(limits[i : i + args.hf_batch])
        width = max(map(len, group))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        greedy = GenerationConfig(
            max_new_tokens=most, do_sample=False, eos_token_id=None, pad_token_id=pad
        )  # no EOS: every row runs to max_new_tokens, and EOS may be chosen like any token
        with torch.inference_mode():
            generated = model.generate(ids, attention_mask=mask, generation_config=greedy)
        outputs += [row[width : width + m].tolist() for row, m in zip(generated, limits[i:], strict=False)]
        prompt_computed += len(group) * width
        decode_computed += len(group) * most
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "prompt_tokens_computed": prompt_computed,  # padding included: generate computes it
        "computed_tokens": prompt_computed + decode_computed,
        "batch": args.hf_batch,
    }
    return result, outputs


def run_vllm(args, prompts: list[list[int]], limits: list[int]) -> tuple[dict, list[list[int]]]:
    """vLLM's offline ``LLM.generate`` with automatic prefix caching, timed after the engine is up."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(p) + m for p, m in zip(prompts, limits, strict=True))
    options = {}
    if args.token_budget is not None:
        options["max_num_batched_tokens"] = args.token_budget
    if args.kv_bytes is not None:
        options["kv_cache_memory_bytes"] = args.kv_bytes
    llm = LLM(
        model=str(args.model),
        dtype=args.dtype,
        enable_prefix_caching=True,
        max_model_len=-(-longest // 16) * 16,
        seed=0,
        **options,
    )
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in limits]
    start = time.perf_counter()
    results = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    # Prompt tokens each request read from the prefix cache; recomputation after a preemption
    # is not reported by vLLM, so under KV pressure its prompt tokens computed are a lower bound.
    cached = sum(r.num_cached_tokens or 0 for r in results)
    result = {
        "seconds": seconds,
        "prompt_tokens_computed": sum(map(len, prompts)) - cached,
        "vllm": vllm.__version__,
        "kv_mib": args.kv_bytes / 2**20 if args.kv_bytes else None,
    }
    return result, [list(r.outputs[0].token_ids) for r in results]


def run_batchrun_torch(args, prompts: list[list[int]], limits: list[int]) -> tuple[dict, list[list[int]]]:
    """batchrun with the torch reference attention (gathers each sequence's blocks) instead of
    the in-place CPU kernel: what the kernel buys."""
    return run_batchrun(args, prompts, limits, attention_backend="torch")


RUNNERS = {
    "batchrun": run_batchrun,
    "batchrun-torch": run_batchrun_torch,
    "generate": run_generate,
    "vllm": run_vllm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=list(RUNNERS))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, help="torch threads (batchrun, generate); vLLM sets its own")
    parser.add_argument("--token-budget", type=int, help="tokens per step (vLLM: max_num_batched_tokens)")
    parser.add_argument("--kv-bytes", type=int, help="KV cache size (vLLM: kv_cache_memory_bytes)")
    parser.add_argument("--hf-batch", type=int, default=32)
    args = parser.parse_args()
    if args.threads and args.system != "vllm":
        import torch

        torch.set_num_threads(args.threads)
    job = json.loads(args.prompts.read_text())
    prompts, limits = job["prompts"], job["max_tokens"]
    result, outputs = RUNNERS[args.system](args, prompts, limits)
    result.setdefault("computed_tokens", result["prompt_tokens_computed"] + sum(map(len, outputs)))
    args.out.write_text(json.dumps({"result": result, "outputs": outputs}))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
