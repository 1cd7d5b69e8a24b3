"""One step's attention on the CPU: the torch reference (gathers every sequence's blocks into
a dense copy, then SDPA) against the in-place kernel (kernels/cpu/), side by side.

    python bench/cpu_attention_bench.py                 # bf16, torch's default thread count
    python bench/cpu_attention_bench.py --dtype float32 --threads 1

A benchmark, not a test: it prints one table and asserts nothing (it does check that both
paths agree). Cases, on a shuffled paged cache (block size 16, 8 query / 2 KV heads, dim 64):

* ``decode`` — 256 sequences × 512 keys, one query each (the issue's microbenchmark);
* ``prefill`` — 4 chunks of 512 queries at the end of 1,024-key contexts;
* ``group decode`` — 8 groups of 32 decodes sharing a 1,024-token prefix, 64 own keys each:
  the reference's cascade kernel (a Python loop over groups) against the kernel's split
  (every group's prefix in one call, merged into each member's own part in a second).

Each case reports milliseconds per call (best of ``--repeat``, the two paths interleaved);
for the kernel, the sequences' keys and values read per second against a ``copy_`` of as
many bytes into a preallocated tensor (the machine's copy bandwidth: what memory-bound
decodes compare with), and the attention FLOPs per second (what compute-bound prefill
compares with).
"""

from __future__ import annotations

import argparse
import time

import torch

from batchrun.kernels.cpu_backend import CpuBackend
from batchrun.kernels.metadata import AttentionMetadata
from batchrun.kernels.torch_ref import TorchBackend

BLOCK, HQ, HKV, D = 16, 8, 2, 64


def step(seqs: list[tuple[int, int]], groups: list[tuple[int, int]], dtype, gen):
    """A packed step over a shuffled cache: ``seqs`` are (context, queries); ``groups`` are
    (members, prefix length) over the first sequences, in order. Returns (meta, q, k, v, kv bytes)."""
    own_blocks = [-(-n // BLOCK) for n, _ in seqs]
    num_blocks = sum(own_blocks) + 1
    shape = (num_blocks + 1, BLOCK, HKV, D)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.full((len(seqs), max(own_blocks)), num_blocks, dtype=torch.int32)
    used = 0
    for i, n in enumerate(own_blocks):
        tables[i, :n] = order[used : used + n]
        used += n
    keys, prefix_lens, first = [-1] * len(seqs), [0] * len(seqs), 0
    for g, (members, prefix_len) in enumerate(groups):
        share = tables[first, : prefix_len // BLOCK].clone()
        for i in range(first, first + members):
            tables[i, : prefix_len // BLOCK] = share
            keys[i], prefix_lens[i] = g, prefix_len
        first += members
    q_lens = [q for _, q in seqs]
    cu = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor([n for n, _ in seqs], dtype=torch.int32),
        block_tables=tables,
        null_block=num_blocks,
        block_size=BLOCK,
        q_lens_host=tuple(q_lens),
        seq_lens_host=tuple(n for n, _ in seqs),
        q_starts_host=tuple(cu),
        group_keys_host=tuple(keys),
        group_prefix_lens_host=tuple(prefix_lens),
    )
    q = torch.randn(cu[-1], HQ, D, generator=gen).to(dtype)
    kv_bytes = 2 * sum(n for n, _ in seqs) * HKV * D * q.element_size()
    # q.k and p.v, 2 FLOPs per multiply-add, over each query's causal keys
    flops = sum(4 * HQ * D * q_len * (n - (q_len - 1) / 2) for n, q_len in seqs)
    return meta, q, k, v, kv_bytes, flops


CASES = {
    "decode": ([(512, 1)] * 256, []),
    "prefill": ([(1024, 512)] * 4, []),
    "group decode": ([(1024 + 64, 1)] * 256, [(32, 1024)] * 8),
}


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    reference, kernel = TorchBackend(cascade_min_saved_tokens=1), CpuBackend()
    print(f"{args.dtype}, {args.threads} thread(s), block {BLOCK}, {HQ}/{HKV} heads, dim {D}")
    print(f"{'case':<14}{'torch ref ms':>13}{'kernel ms':>11}{'speed-up':>10}", end="")
    print(f"{'kernel KV GB/s':>16}{'copy GB/s':>11}{'kernel GFLOP/s':>16}")
    for name, (seqs, groups) in CASES.items():
        *case, flops = step(seqs, groups, dtype, gen)
        ref_ms, kernel_ms, kv_bytes, copy_ms = measure(reference, kernel, *case, args)
        print(
            f"{name:<14}{ref_ms:>13.2f}{kernel_ms:>11.2f}{ref_ms / kernel_ms:>9.1f}×"
            f"{kv_bytes / kernel_ms / 1e6:>16.1f}{kv_bytes / copy_ms / 1e6:>11.1f}"
            f"{flops / kernel_ms / 1e6:>16.1f}"
        )


def measure(reference, kernel, meta, q, k, v, kv_bytes, args) -> tuple[float, float, int, float]:
    """Both backends on one step (checked to agree), interleaved; then a copy of kv_bytes."""
    ref_state, cpu_state = reference.build(meta), kernel.build(meta)
    bf16 = q.dtype == torch.bfloat16
    torch.testing.assert_close(
        kernel.forward(cpu_state, q, k, v, D**-0.5).float(),
        reference.forward(ref_state, q, k, v, D**-0.5).float(),
        atol=2e-2 if bf16 else 1e-4,
        rtol=2e-2 if bf16 else 1e-4,
    )
    ref_ms = kernel_ms = float("inf")
    for _ in range(2):  # interleaved, so both see the same machine
        ref_ms = min(ref_ms, best_ms(lambda: reference.forward(ref_state, q, k, v, D**-0.5), args.repeat))
        kernel_ms = min(kernel_ms, best_ms(lambda: kernel.forward(cpu_state, q, k, v, D**-0.5), args.repeat))
    source = torch.ones(kv_bytes // 2, dtype=torch.bfloat16)
    target = torch.empty_like(source)  # allocated (and faulted in) once, outside the timing
    return ref_ms, kernel_ms, kv_bytes, best_ms(lambda: target.copy_(source), args.repeat)


if __name__ == "__main__":
    main()
