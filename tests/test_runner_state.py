"""The runner's side of the step message: its persistent per-request state, and the step
inputs it builds from a message (no model involved)."""

from __future__ import annotations

import numpy as np
import torch

from batchrun.core.params import SamplingParams
from batchrun.core.runner.input_batch import InputBatch
from batchrun.core.runner.model_runner import attention_metadata
from batchrun.core.runner.staging import HostStaging
from batchrun.core.sched.messages import NewRequest, ScheduledChunk, StepPlan
from batchrun.kernels import get_backend
from batchrun.kernels.backend import BackendCapabilities

NULL = 99


def new(req_id, tokens, blocks, computed=0, group=None):
    tokens = np.asarray(tokens, dtype=np.int32)
    return NewRequest(
        req_id, tokens, len(tokens), computed, tuple(blocks), SamplingParams(max_tokens=4), None, group
    )


def test_step_inputs_come_from_the_persistent_tables():
    batch = InputBatch(block_size=4, null_block=NULL, slots=1, width=1)  # both grow on demand
    a = new(7, range(10, 19), blocks=[5, 6, 2])  # 9 prompt tokens, nothing cached
    b = new(8, range(30, 36), blocks=[0, 4], computed=4, group=(3, 4))  # attached to a 4-token prefix
    step = StepPlan((ScheduledChunk(7, 6, False), ScheduledChunk(8, 2, True)), new_requests=(a, b))
    batch.apply(step)
    inputs = batch.step_inputs(step)
    assert inputs.input_ids.tolist() == [10, 11, 12, 13, 14, 15, 34, 35]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 5, 4, 5]
    # slot = block * 4 + offset: a's positions 0-5 in blocks 5, 6; b's 4-5 in its second block (4)
    assert inputs.slot_mapping.tolist() == [20, 21, 22, 23, 24, 25, 16, 17]
    assert inputs.cu_seqlens_q.tolist() == [0, 6, 8] and inputs.seq_lens.tolist() == [6, 6]
    assert inputs.block_tables.tolist() == [[5, 6, 2], [0, 4, NULL]]  # padded with the null block
    assert inputs.group_keys.tolist() == [-1, 3] and inputs.group_prefix_lens.tolist() == [0, 4]
    assert inputs.sample_rows.tolist() == [7] and inputs.sample_req_ids == (8,)
    batch.record(step, (8,), (42,))

    # Next step: a finishes its prompt, b decodes its sampled token and opens a new block.
    step = StepPlan((ScheduledChunk(8, 1, True), ScheduledChunk(7, 3, True)), new_block_ids={8: (1,)})
    batch.apply(step)
    inputs = batch.step_inputs(step)
    assert inputs.input_ids.tolist() == [42, 16, 17, 18]
    assert inputs.positions.tolist() == [6, 6, 7, 8]
    assert inputs.block_tables.tolist() == [[0, 4, 1], [5, 6, 2]]
    batch.record(step, (8, 7), (43, 44))

    # b finishes; a is preempted and comes back with its output, on other blocks.
    step = StepPlan(
        (ScheduledChunk(7, 10, True),),
        new_requests=(new(7, [*range(10, 19), 44], blocks=[1, 3, 0]),),
        finished_req_ids=(8,),
        preempted_req_ids=(7,),
    )
    batch.apply(step)
    assert len(batch) == 1
    inputs = batch.step_inputs(step)
    assert inputs.input_ids.tolist() == [*range(10, 19), 44] and inputs.block_tables.tolist() == [[1, 3, 0]]


def test_the_torch_backend_plans_once_per_step():
    """Index tensors and cascade groups are built in ``build``, not per layer."""
    backend = get_backend("torch", cascade_min_saved_tokens=1)
    batch = InputBatch(block_size=4, null_block=NULL)
    reqs = [new(i, range(12), blocks=[0, 1, 2 + i], computed=11, group=(0, 8)) for i in range(3)]
    step = StepPlan(tuple(ScheduledChunk(i, 1, True) for i in range(3)), new_requests=tuple(reqs))
    batch.apply(step)
    inputs = batch.step_inputs(step)
    state = backend.build(attention_metadata(inputs, NULL, block_size=4))
    assert len(state.cascades) == 1 and state.cascades[0].prefix_blocks == 2
    assert state.cascades[0].rows.tolist() == [0, 1, 2] and state.decodes is None and not state.chunks


def test_capabilities_say_why_a_backend_cannot_run():
    caps = BackendCapabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.bfloat16}),
        block_size_multiple=256,
        softcap=False,
    )
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert caps.unsupported(cuda, torch.bfloat16, 256, softcap=False, sliding_window=False) is None
    assert "cpu" in caps.unsupported(cpu, torch.bfloat16, 256, False, False)
    assert "float32" in caps.unsupported(cuda, torch.float32, 256, False, False)
    assert "multiple of 256" in caps.unsupported(cuda, torch.bfloat16, 16, False, False)
    assert "soft-cap" in caps.unsupported(cuda, torch.bfloat16, 512, softcap=True, sliding_window=False)


def test_host_staging_reuses_its_buffers_step_after_step():
    staging = HostStaging(torch.device("cpu"), pin_memory=False)  # pinned only on CUDA machines
    first = [staging(np.arange(5)), staging(np.ones((2, 3), dtype=np.int32))]
    assert first[0].tolist() == list(range(5)) and first[1].shape == (2, 3)
    buffers = list(staging._buffers)
    staging.new_step()
    again = staging(np.arange(7) * 2)  # same slot, still fits: no new buffer
    assert again.tolist() == [0, 2, 4, 6, 8, 10, 12] and staging._buffers[0] is buffers[0]
    staging(np.zeros(1000, dtype=np.int32))  # grows the second slot
    assert staging._buffers[1].numel() >= 1000 and staging._buffers[1] is not buffers[1]
