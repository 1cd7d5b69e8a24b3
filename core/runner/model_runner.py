"""Runs one step through the model: the step message in, the sampled tokens out.

inputs = batch.step_inputs(plan)        # NumPy, from the persistent per-request state
state  = backend.build(metadata)        # once per step: the backend's index tensors
logits = model(...)                     # every layer: write K/V, attend via `state`
tokens = sample(logits)                 # one token per chunk that completes its request

With ``graphs`` (CUDA, a backend that runs in CUDA graphs), steps of up to a few hundred
tokens are padded and replayed from a captured graph instead (runner/cuda_graphs.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from batchrun.core.runner.attention_hook import StepContext
from batchrun.core.runner.cuda_graphs import Capture, DeviceStep, StepGraphs, cuda_graph_capture
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
        self.graphs: StepGraphs | None = None

    def use_graphs(self, capture: Capture = cuda_graph_capture) -> StepGraphs:
        """Run small steps in graphs from now on (the backend must have ``cuda_graphs``)."""
        if not self.backend.capabilities.cuda_graphs:
            raise ValueError(f"attention backend {self.backend.name!r} does not run in CUDA graphs")
        self.graphs = StepGraphs(
            lambda inputs: self._prepare(inputs, static_shapes=True),
            self._forward,
            self.backend,
            self.kv_cache.null_block,
            self.kv_cache.spec.block_size,
            capture,
        )
        return self.graphs

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run the step; return the token sampled for each chunk whose ``samples`` is true."""
        self.batch.apply(plan)
        inputs = self.batch.step_inputs(plan)
        self._staging.new_step()
        logits = self.graphs.run(inputs) if self.graphs is not None else None
        if logits is None:
            logits = self._forward(self._prepare(inputs)).float()
        result = self._sample(logits, inputs)
        self.batch.record(plan, result.req_ids, result.token_ids)
        return result

    def _prepare(self, inputs: StepInputs, static_shapes: bool = False) -> DeviceStep:
        """The step's tensors on the device and the backend's state for it."""
        block_size = self.kv_cache.spec.block_size
        meta = attention_metadata(inputs, self.kv_cache.null_block, block_size, self._staging, static_shapes)
        state = self.backend.build(meta)
        staged = map(self._staging, (inputs.input_ids, inputs.positions, inputs.sample_rows))
        return DeviceStep(*staged, state)

    def _forward(self, step: DeviceStep) -> torch.Tensor:
        """(R, vocab) logits in the model's dtype: one row per sampled row, in chunk order."""
        with self.overrides:
            out = self.model(
                input_ids=step.input_ids[None],
                position_ids=step.positions[None],
                use_cache=False,
                logits_to_keep=step.sample_rows,
                batchrun_step=StepContext(self.kv_cache, self.backend, step.state),
            )
        return out.logits[0]

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
    static_shapes: bool = False,
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
        static_shapes=static_shapes,
    )
