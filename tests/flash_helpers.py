"""Helpers for the flash backend's tests: a pure-torch ``varlen_attn`` and random packed steps.

``reference_varlen`` is torch.nn.attention.varlen.varlen_attn's contract, written from its
documentation with plain loops over sequences (not from the flash backend), so the backend
runs on CPU; ``tests/test_flash_gpu.py`` checks it against the real kernel on a GPU. The
contract:

* ``query`` (Tq, Hq, D): sequence ``b`` owns rows ``cu_seq_q[b]:cu_seq_q[b+1]``;
* ``key`` / ``value`` (Tk, Hkv, D): sequence ``b`` owns rows ``cu_seq_k[b]:cu_seq_k[b+1]``,
  of which only the first ``seqused_k[b]`` are read when given; or, with ``block_table``
  (N, pages) int32 (which needs ``seqused_k``), a pool (pages, page_size, Hkv, D) in which key
  ``p`` of sequence ``b`` is ``key[block_table[b, p // page_size], p % page_size]``;
* ``Hq != Hkv`` only with ``enable_gqa``: query head ``h`` reads KV head ``h // (Hq // Hkv)``;
* ``window_size=(left, right)``: query ``i`` of ``Lq`` against ``Lk`` keys sits at key position
  ``i + Lk - Lq`` (bottom-right, FlashAttention's convention) and sees keys ``pos - left ..
  pos + right``, -1 meaning unbounded: (-1, -1) full, (-1, 0) causal;
* ``return_aux`` with ``lse``: also the natural-log log-sum-exp of the scaled scores, laid out
  (Hq, Tq) as the kernel and torch's fake registration return it (the docstring says (Tq, Hq));
* ``scale`` defaults to ``D ** -0.5``; ``num_splits`` changes nothing here.

Where the kernel would reject or silently mis-handle an input, this raises instead: int32
offsets, tables and lengths; ``max_q`` / ``max_k`` below a sequence's length (FlashAttention
sizes its work, and clips the window, by them); a query row that sees no key (left undefined).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from batchrun.kernels.flash import VarlenKernel
from batchrun.kernels.metadata import AttentionMetadata
from batchrun.kernels.torch_ref import TorchBackend


def reference_varlen(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    args = dict(cu_seq_q=cu_seq_q, cu_seq_k=cu_seq_k, seqused_k=seqused_k, block_table=block_table)
    for name, tensor in args.items():
        if tensor is not None and tensor.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, not {tensor.dtype}")
    if block_table is not None and seqused_k is None:
        raise ValueError("block_table needs seqused_k")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key.shape[-2]
    if num_heads != num_kv_heads and not enable_gqa:
        raise ValueError(f"Hq={num_heads} and Hkv={num_kv_heads} need enable_gqa=True")
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    left, right = window_size
    device = query.device
    out = torch.zeros(query.shape, dtype=torch.float64, device=device)
    lse = torch.zeros(num_heads, query.shape[0], dtype=torch.float64, device=device)
    cu_q, cu_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    assert len(cu_q) == len(cu_k), "cu_seq_q and cu_seq_k describe different batches"
    for b in range(len(cu_q) - 1):
        q = query[cu_q[b] : cu_q[b + 1]].double()  # (Lq, Hq, D)
        if block_table is not None:
            used = int(seqused_k[b])
            pages = block_table[b, : -(-used // key.shape[1])].long()
            if pages.numel() * key.shape[1] < used:
                raise ValueError(f"sequence {b}: {used} keys need more pages than its table has")
            k = key[pages].flatten(0, 1)[:used].double()  # (Lk, Hkv, D)
            v = value[pages].flatten(0, 1)[:used].double()
        else:
            used = cu_k[b + 1] - cu_k[b] if seqused_k is None else int(seqused_k[b])
            k = key[cu_k[b] : cu_k[b] + used].double()
            v = value[cu_k[b] : cu_k[b] + used].double()
        q_len, k_len = q.shape[0], k.shape[0]
        if q_len > max_q or k_len > max_k:
            raise ValueError(f"sequence {b}: {q_len} queries / {k_len} keys exceed max_q / max_k")
        pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)  # (Lq, 1) key position
        j = torch.arange(k_len, device=device)[None, :]  # (1, Lk)
        visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        if left >= 0:
            visible &= j >= pos - left
        if right >= 0:
            visible &= j <= pos + right
        if not visible.any(dim=1).all():
            raise ValueError(f"sequence {b}: a query sees no key")
        k = k.repeat_interleave(group, dim=1)  # (Lk, Hq, D)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # (Hq, Lq)
        probs = torch.exp(scores - row_lse[..., None])
        out[cu_q[b] : cu_q[b + 1]] = torch.einsum("hqk,khd->qhd", probs, v)
        lse[:, cu_q[b] : cu_q[b + 1]] = row_lse
    out = out.to(query.dtype)
    if return_aux is not None and return_aux.lse:
        return out, lse.float()
    return out


def with_2_11_signature(attend):
    """``attend`` behind torch 2.11's signature: no block_table, seqused_k, enable_gqa, num_splits."""

    def varlen_2_11(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
    ):
        options = dict(return_aux=return_aux, scale=scale, window_size=window_size)
        return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **options)

    return varlen_2_11


def reference_kernel(attend=reference_varlen) -> VarlenKernel:
    """``attend`` as the flash backend's kernel: any device, dtype and page size."""
    return VarlenKernel(
        attend,
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        page_size_multiple=1,
    )


# -- random packed steps ---------------------------------------------------------------------------


class Seq(NamedTuple):
    q_len: int  # new tokens this step
    kv_len: int  # cached tokens after this step
    group: int | None = None  # the first-level group whose prefix its keys start with


class Step(NamedTuple):
    meta: AttentionMetadata
    query: torch.Tensor  # (T, Hq, D)
    k_cache: torch.Tensor  # (num_blocks + 1, block_size, Hkv, D), NaN where nothing may be read
    v_cache: torch.Tensor

    def to(self, device, dtype) -> Step:
        meta = self.meta._replace(
            **{
                f: getattr(self.meta, f).to(device)
                for f in ("slot_mapping", "cu_seqlens_q", "seq_lens", "block_tables")
            }
        )
        return Step(meta, *(t.to(device, dtype) for t in (self.query, self.k_cache, self.v_cache)))


def make_step(seqs, prefixes, *, block_size, num_kv_heads, group, head_dim=32, seed=0) -> Step:
    """Float32 on CPU, blocks shuffled; each group's members share the blocks of its prefix
    (whole blocks). Every slot no sequence owns (the null block, the tail of each last block,
    a block nobody holds) is NaN, so a single stray read shows."""
    gen = torch.Generator().manual_seed(seed)
    shared = [p // block_size for p in prefixes]
    own = [-(-s.kv_len // block_size) - (shared[s.group] if s.group is not None else 0) for s in seqs]
    num_blocks = sum(shared) + sum(own) + 2  # one block nobody holds
    ids = iter(torch.randperm(num_blocks, generator=gen).tolist())
    group_blocks = [[next(ids) for _ in range(n)] for n in shared]
    tables = [(group_blocks[s.group] if s.group is not None else []) + [next(ids) for _ in range(n)]
              for s, n in zip(seqs, own, strict=True)]  # fmt: skip
    shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)  # block num_blocks is the null block
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    for s, table in zip(seqs, tables, strict=True):
        for pos in range(s.kv_len):
            block, slot = table[pos // block_size], pos % block_size
            if torch.isnan(k_cache[block, slot, 0, 0]):  # a shared prefix slot is written once
                k_cache[block, slot] = torch.randn(num_kv_heads, head_dim, generator=gen)
                v_cache[block, slot] = torch.randn(num_kv_heads, head_dim, generator=gen)
    width = max(map(len, tables)) + 1
    block_tables = torch.tensor([t + [num_blocks] * (width - len(t)) for t in tables], dtype=torch.int32)
    q_lens = [s.q_len for s in seqs]
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor([s.kv_len for s in seqs], dtype=torch.int32),
        block_tables=block_tables,
        null_block=num_blocks,
        block_size=block_size,
        q_lens_host=tuple(q_lens),
        seq_lens_host=tuple(s.kv_len for s in seqs),
        q_starts_host=tuple(cu),
        group_keys_host=tuple(-1 if s.group is None else s.group for s in seqs),
        group_prefix_lens_host=tuple(0 if s.group is None else prefixes[s.group] for s in seqs),
    )
    query = torch.randn(cu[-1], num_kv_heads * group, head_dim, generator=gen)
    return Step(meta, query, k_cache, v_cache)


def mixed(block_size: int) -> tuple[list[Seq], list[int]]:
    """Decodes and prefill chunks, alone and in two groups: members decoding, chunking after
    the prefix, sitting right after it, filling their last block exactly, and one still
    computing the prefix (sequence 8, not split)."""
    p0, p1 = 2 * block_size, block_size
    seqs = [
        Seq(1, 1), Seq(1, 70), Seq(20, 20), Seq(9, 45), Seq(block_size, 2 * block_size),
        Seq(1, p0 + 5, 0), Seq(4, p0 + 20, 0), Seq(1, p0 + 1, 0), Seq(10, p0 + 3, 0),
        Seq(1, p1 + block_size, 1), Seq(3, p1 + 3, 1),
    ]  # fmt: skip
    return seqs, [p0, p1]


def torch_reference(step: Step, scale: float, window: int | None = None) -> torch.Tensor:
    """The torch reference backend's forward (it masks the slots it must not read: zeros there)."""
    clean = torch.nan_to_num(step.k_cache), torch.nan_to_num(step.v_cache)
    backend = TorchBackend()
    return backend.forward(backend.build(step.meta), step.query, *clean, scale, sliding_window=window)
