"""Runs one step through the model: the step message in, the sampled tokens out.

inputs = batch.step_inputs(plan)        # NumPy, from the persistent per-request state
state  = backend.build(metadata)        # once per step: the backend's index tensors
logits = model(...)                     # every layer: write K/V, attend via `state`
tokens = sample(logits)                 # one token per chunk that completes its request
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from batchrun.core.runner.attention_hook import StepContext
from batchrun.core.runner.input_batch import InputBatch, StepInputs
from batchrun.core.runner.kv_cache import KVCache
from batchrun.core.runner.layer_overrides import LayerOverrides
from batchrun.core.runner.sampler import sample, token_logprobs
from batchrun.core.runner.staging import HostStaging
from batchrun.core.sched.messages import StepPlan, StepResult
from batchrun.kernels import AttentionBackend, AttentionMetadata


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        backend: AttentionBackend,
        eos_token_ids: tuple[int, ...] = (),
        overrides: LayerOverrides | None = None,
    ) -> None:
        self.model = model
        self.overrides = overrides or LayerOverrides()  # layers run by batchrun's kernels
        self.eos_token_ids = eos_token_ids  # masked while a row is below its min_tokens
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = next(model.parameters()).device
        self.batch = InputBatch(kv_cache.spec.block_size, kv_cache.null_block)
        self._staging = HostStaging(self.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run the step; return the token sampled for each chunk whose ``samples`` is true."""
        self.batch.apply(plan)
        inputs = self.batch.step_inputs(plan)
        self._staging.new_step()
        meta = attention_metadata(
            inputs, self.kv_cache.null_block, self.kv_cache.spec.block_size, self._staging
        )
        state = self.backend.build(meta)
        with self.overrides:
            out = self.model(
                input_ids=self._staging(inputs.input_ids)[None],
                position_ids=self._staging(inputs.positions)[None],
                use_cache=False,
                logits_to_keep=self._staging(inputs.sample_rows),
                batchrun_step=StepContext(self.kv_cache, self.backend, state),
            )
        logits = out.logits[0].float()  # (R, vocab): one row per sampling chunk, in chunk order
        result = self._sample(logits, inputs)
        self.batch.record(plan, result.req_ids, result.token_ids)
        return result

    def _sample(self, logits: torch.Tensor, inputs: StepInputs) -> StepResult:
        req_ids = inputs.sample_req_ids
        params, seeds, histories = (
            zip(*map(self.batch.sampling_of, req_ids), strict=True) if req_ids else ((), (), ())
        )
        raw = logits.clone() if any(p.logprobs is not None for p in params) else logits
        tokens = sample(logits, list(params), list(seeds), list(histories), self.eos_token_ids)
        logprobs = {}
        asking = [i for i, p in enumerate(params) if p.logprobs is not None]
        if asking:
            top = max(params[i].logprobs for i in asking)
            entries = token_logprobs(raw[asking], [tokens[i] for i in asking], top)
            for i, entry in zip(asking, entries, strict=True):
                logprobs[req_ids[i]] = entry | {"top": entry["top"][: params[i].logprobs]}
        return StepResult(req_ids, tuple(tokens), logprobs)


def attention_metadata(
    inputs: StepInputs,
    null_block: int,
    block_size: int,
    to_device: Callable[[np.ndarray], torch.Tensor] = torch.from_numpy,
) -> AttentionMetadata:
    """The kernels' view of a step: device tensors plus host copies of the lengths."""
    return AttentionMetadata(
        slot_mapping=to_device(inputs.slot_mapping),
        cu_seqlens_q=to_device(inputs.cu_seqlens_q),
        seq_lens=to_device(inputs.seq_lens),
        block_tables=to_device(inputs.block_tables),
        null_block=null_block,
        block_size=block_size,
        q_lens_host=tuple(np.diff(inputs.cu_seqlens_q).tolist()),
        seq_lens_host=tuple(inputs.seq_lens.tolist()),
        q_starts_host=tuple(inputs.cu_seqlens_q.tolist()),
        group_keys_host=tuple(inputs.group_keys.tolist()),
        group_prefix_lens_host=tuple(inputs.group_prefix_lens.tolist()),
    )
