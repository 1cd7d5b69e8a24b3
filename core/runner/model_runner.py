"""Runs one packed step through the model and returns the logits to sample from."""

from __future__ import annotations

import torch

from batchrun.core.runner.attention_hook import StepContext
from batchrun.core.runner.kv_cache import KVCache
from batchrun.core.sched.scheduler import StepBatch
from batchrun.kernels import AttentionBackend, AttentionMetadata

# Use the cascade kernel for a decode group when it spares at least this many prefix-token
# reads ((members - 1) x prefix length); below it the per-group overhead costs more (CPU).
CASCADE_MIN_SAVED_TOKENS = 2048


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, backend: AttentionBackend) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Run the step; return float32 logits ``(num_sampling_chunks, vocab)``, one row per
        chunk whose ``samples`` is true, in chunk order."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        block_size = self.kv_cache.spec.block_size
        for chunk in batch.chunks:
            request = chunk.request
            start = request.num_computed_tokens
            end = start + chunk.num_tokens
            input_ids += request.token_ids(start, end)
            positions += range(start, end)
            table = request.block_ids
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
            if chunk.samples:
                sample_rows.append(len(input_ids) - 1)

        meta = self._metadata(batch, slots)
        device = self.device
        out = self.model(
            input_ids=torch.tensor([input_ids], device=device),
            position_ids=torch.tensor([positions], device=device),
            use_cache=False,
            logits_to_keep=torch.tensor(sample_rows, dtype=torch.long, device=device),
            batchrun_step=StepContext(self.kv_cache, meta, self.backend),
        )
        return out.logits[0].float()  # (num_sampling_chunks, vocab)

    def _decode_groups(self, batch: StepBatch) -> tuple[tuple[tuple[int, ...], int], ...]:
        """Decoding chunks grouped by the prefix their requests share, for the cascade kernel:
        only groups where reading the prefix once saves enough (a call per group has a fixed
        cost; many small groups run faster through the batched decode path)."""
        block_size = self.kv_cache.spec.block_size
        groups: dict[tuple[int, int], list[int]] = {}
        for i, chunk in enumerate(batch.chunks):
            group = chunk.request.prefix_group
            if chunk.num_tokens == 1 and group is not None and group[1] >= block_size:
                groups.setdefault(group, []).append(i)
        return tuple(
            (tuple(members), prefix_len // block_size)
            for (_, prefix_len), members in groups.items()
            if (len(members) - 1) * prefix_len >= CASCADE_MIN_SAVED_TOKENS
        )

    def _metadata(self, batch: StepBatch, slots: list[int]) -> AttentionMetadata:
        q_lens = tuple(c.num_tokens for c in batch.chunks)
        seq_lens = tuple(c.request.num_computed_tokens + c.num_tokens for c in batch.chunks)
        width = max(len(c.request.block_ids) for c in batch.chunks)
        tables = [c.request.block_ids + [0] * (width - len(c.request.block_ids)) for c in batch.chunks]
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        device = self.device
        return AttentionMetadata(
            decode_groups=self._decode_groups(batch),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            q_lens_host=q_lens,
            seq_lens_host=seq_lens,
            q_starts_host=tuple(cu),
        )
