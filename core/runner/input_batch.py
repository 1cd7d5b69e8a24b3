"""The runner's persistent copy of every live request, and each step's inputs built from it.

The scheduler sends a request in full once (``NewRequest``); afterwards a step message only
says how many tokens run and which blocks were added. This module keeps, per request, a
slot in NumPy arrays (block table row, computed count, group) and its token ids, and turns
a ``StepPlan`` into the packed step's arrays with vectorised NumPy: a Python loop over the
step's sequences at most, never over its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchrun.core.params import SamplingParams
from batchrun.core.runner.sampler import History
from batchrun.core.sched.messages import NewRequest, StepPlan


@dataclass(frozen=True)
class StepInputs:
    """One packed step of T tokens from S sequences (NumPy, host side)."""

    req_ids: tuple[int, ...]  # (S,) in packing order
    input_ids: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64
    slot_mapping: np.ndarray  # (T,) int64: cache slot of each new token
    cu_seqlens_q: np.ndarray  # (S + 1,) int32
    seq_lens: np.ndarray  # (S,) int32: cached tokens after the step
    block_tables: np.ndarray  # (S, W) int32, padded with the null block
    group_keys: np.ndarray  # (S,) int64: first-level group key, -1 for none
    group_prefix_lens: np.ndarray  # (S,) int64: tokens of that group's shared prefix
    sample_rows: np.ndarray  # (R,) int64: packed rows whose logits are sampled
    sample_req_ids: tuple[int, ...]  # (R,) the requests those rows sample for


class InputBatch:
    def __init__(self, block_size: int, null_block: int, slots: int = 64, width: int = 16) -> None:
        self.block_size = block_size
        self.null_block = null_block
        self.block_table = np.full((slots, width), null_block, dtype=np.int32)
        self.num_blocks = np.zeros(slots, dtype=np.int64)
        self.num_computed = np.zeros(slots, dtype=np.int64)
        self.num_tokens = np.zeros(slots, dtype=np.int64)
        self.group_key = np.full(slots, -1, dtype=np.int64)
        self.group_prefix_len = np.zeros(slots, dtype=np.int64)
        self.tokens: list[np.ndarray | None] = [None] * slots  # per slot, capacity prompt + max_tokens
        self.params: list[SamplingParams | None] = [None] * slots
        self.seeds: list[int | None] = [None] * slots
        self.prompt_lens = np.zeros(slots, dtype=np.int64)
        self.slot_of: dict[int, int] = {}
        self._free_slots = list(range(slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.slot_of)

    # -- updates from the scheduler's message ------------------------------------------

    def apply(self, plan: StepPlan) -> None:
        for req_id in plan.finished_req_ids + plan.preempted_req_ids:
            self._remove(req_id)
        for new in plan.new_requests:
            self._add(new)
        for req_id, blocks in plan.new_block_ids.items():
            self._append_blocks(self.slot_of[req_id], blocks)

    def record(self, plan: StepPlan, req_ids: tuple[int, ...], token_ids: tuple[int, ...]) -> None:
        """The step ran: advance computed counts and append the sampled tokens."""
        for chunk in plan.chunks:
            self.num_computed[self.slot_of[chunk.req_id]] += chunk.num_tokens
        for req_id, token in zip(req_ids, token_ids, strict=True):
            slot = self.slot_of[req_id]
            self.tokens[slot][self.num_tokens[slot]] = token
            self.num_tokens[slot] += 1

    def _add(self, new: NewRequest) -> None:
        if new.req_id in self.slot_of:  # back after a preemption whose notice it missed
            self._remove(new.req_id)
        if not self._free_slots:
            self._grow_slots()
        slot = self._free_slots.pop()
        self.slot_of[new.req_id] = slot
        capacity = new.prompt_len + new.params.max_tokens
        tokens = np.zeros(capacity, dtype=np.int64)
        tokens[: len(new.token_ids)] = new.token_ids
        self.tokens[slot] = tokens
        self.num_tokens[slot] = len(new.token_ids)
        self.num_computed[slot] = new.num_computed_tokens
        self.prompt_lens[slot] = new.prompt_len
        self.params[slot] = new.params
        self.seeds[slot] = new.seed
        key, prefix_len = new.prefix_group or (-1, 0)
        self.group_key[slot], self.group_prefix_len[slot] = key, prefix_len
        self.num_blocks[slot] = 0
        self.block_table[slot] = self.null_block
        self._append_blocks(slot, new.block_ids)

    def _remove(self, req_id: int) -> None:
        slot = self.slot_of.pop(req_id)
        self.tokens[slot] = None
        self.params[slot] = None
        self._free_slots.append(slot)

    def _append_blocks(self, slot: int, blocks: tuple[int, ...]) -> None:
        start = int(self.num_blocks[slot])
        end = start + len(blocks)
        if end > self.block_table.shape[1]:
            self._grow_width(end)
        self.block_table[slot, start:end] = blocks
        self.num_blocks[slot] = end

    def _grow_slots(self) -> None:
        old = len(self.num_blocks)
        grow = lambda a, fill: np.concatenate([a, np.full((old, *a.shape[1:]), fill, dtype=a.dtype)])  # noqa: E731
        self.block_table = grow(self.block_table, self.null_block)
        self.num_blocks, self.num_computed = grow(self.num_blocks, 0), grow(self.num_computed, 0)
        self.num_tokens, self.prompt_lens = grow(self.num_tokens, 0), grow(self.prompt_lens, 0)
        self.group_key, self.group_prefix_len = grow(self.group_key, -1), grow(self.group_prefix_len, 0)
        self.tokens += [None] * old
        self.params += [None] * old
        self.seeds += [None] * old
        self._free_slots = list(range(2 * old - 1, old - 1, -1)) + self._free_slots

    def _grow_width(self, needed: int) -> None:
        width = max(needed, 2 * self.block_table.shape[1])
        table = np.full((len(self.block_table), width), self.null_block, dtype=np.int32)
        table[:, : self.block_table.shape[1]] = self.block_table
        self.block_table = table

    # -- the step's inputs ---------------------------------------------------------------

    def step_inputs(self, plan: StepPlan) -> StepInputs:
        chunks = plan.chunks
        slots = np.fromiter((self.slot_of[c.req_id] for c in chunks), dtype=np.int64, count=len(chunks))
        q_lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=len(chunks))
        samples = np.fromiter((c.samples for c in chunks), dtype=bool, count=len(chunks))
        starts = self.num_computed[slots]  # (S,) first position each chunk computes
        cu = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        total = int(cu[-1])
        # position of packed token t = start of its sequence + (t - first packed row of it)
        positions = np.repeat(starts - cu[:-1], q_lens) + np.arange(total, dtype=np.int64)
        token_slots = np.repeat(slots, q_lens)
        bs = self.block_size
        slot_mapping = self.block_table[token_slots, positions // bs].astype(np.int64) * bs + positions % bs
        input_ids = np.concatenate(
            [
                self.tokens[s][b : b + n]
                for s, b, n in zip(slots.tolist(), starts.tolist(), q_lens.tolist(), strict=True)
            ]
        )
        seq_lens = starts + q_lens
        width = int(self.num_blocks[slots].max())
        return StepInputs(
            req_ids=tuple(c.req_id for c in chunks),
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            cu_seqlens_q=cu.astype(np.int32),
            seq_lens=seq_lens.astype(np.int32),
            block_tables=self.block_table[slots, :width],
            group_keys=self.group_key[slots],
            group_prefix_lens=self.group_prefix_len[slots],
            sample_rows=cu[1:][samples] - 1,
            sample_req_ids=tuple(c.req_id for c in chunks if c.samples),
        )

    def sampling_of(self, req_id: int) -> tuple[SamplingParams, int | None, History]:
        """A request's sampling parameters, seed, and the tokens it has seen (views)."""
        slot = self.slot_of[req_id]
        tokens, prompt_len = self.tokens[slot], int(self.prompt_lens[slot])
        history = History(tokens[:prompt_len], tokens[prompt_len : self.num_tokens[slot]])
        return self.params[slot], self.seeds[slot], history
