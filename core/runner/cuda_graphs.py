"""CUDA graphs for the runner's small steps: decode-only steps and small mixed ones.

A decode step of a 7B model launches hundreds of kernels (every layer's projections, norms,
rotary, the K/V store and the attention launches) whose GPU time is a few microseconds
each; launched one by one from Python, the GPU waits on the CPU. A CUDA graph replays the
whole step's launches in one call. A graph fixes every tensor's shape and address and every
launch parameter, so a step runs in one only after it is padded to a shape seen before:

    T tokens, S sequences  ->  T_B = the smallest bucket >= T (GRAPH_TOKEN_BUCKETS)
    sequences              ->  T_B: the S real ones, then T_B - T *padding* sequences of one
                               token each (token 0 at position 0, its K/V written to and read
                               from the null block, which no request owns), then empty ones
                               (no token, no key)
    block-table width      ->  the next power of two
    sampled rows           ->  T_B (row 0 repeated); only the first R logits are used

Every real sequence keeps its rows, positions and keys, so its results are those of the
unpadded step (up to the kernels' tile sizes); padding rows attend only to the null block.
The attention backend's own host values (tile sizes, split counts) become part of the graph's
key (``AttentionBackend.graph_inputs``): the backend rounds them so that few graphs cover all
steps, and a replayed step is launched exactly as its eager run would be.

A replay refreshes the captured step's input tensors in place (token ids, positions, sampled
rows, and the backend's state: slot mapping, query offsets, lengths, tables, the cascade's
group layout) and reruns the captured launches. A key is captured the second time it is seen
(the first runs the padded step eagerly, which also compiles its kernels), at most
``MAX_GRAPHS`` keys; other steps run eagerly. That first eager run goes under a probe
(runner/host_sync_probe.py): if the forward reads a device value on the host or copies between
host and device, it cannot be captured, and graphs are turned off for the run with a warning
that names the ops. All graphs share one memory pool: they run one
at a time and each step's logits are consumed (sampled) before the next replay; every graph
copies its logits into one shared buffer (largest bucket x vocab, float32), so the pool holds
about one small step's activations, not one output per graph. If a capture fails, graphs are
turned off for the run with a warning and every step runs eagerly.

On CPU there is no graph to capture; the tests stand ``rerun_capture`` in for it — a replay
reruns the forward bound to the captured (static) tensors, so any input a replay fails to
refresh gives wrong tokens there, as it would on a GPU.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchrun.core.runner.host_sync_probe import HostSyncProbe
from batchrun.core.runner.input_batch import StepInputs
from batchrun.kernels import AttentionBackend

log = logging.getLogger(__name__)

# Steps of up to 512 tokens run in graphs: every decode-only step of a 512-sequence batch,
# and mixed steps small enough that launch overhead is a real share of the step. Spaced so
# padding wastes under a third of a step past 16 tokens (the figures are first guesses; no
# GPU has been available to measure them).
GRAPH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128)
GRAPH_TOKEN_BUCKETS += (160, 192, 224, 256, 320, 384, 448, 512)
MAX_GRAPHS = 96

Forward = Callable[[], torch.Tensor]  # the step's forward, bound to its input tensors; -> logits
Capture = Callable[[Forward, Any], Forward]  # (forward, pool) -> replay


def graph_memory_bytes(model_config: Any, dtype: torch.dtype, tokens: int = GRAPH_TOKEN_BUCKETS[-1]) -> int:
    """An estimate, on the generous side, of the GPU memory graphs hold outside the KV cache:
    the shared float32 logits buffer, and the largest graph's temporaries in their pool — its
    logits in the model's dtype and a layer's activations (the gated MLP's are the largest) —
    plus 64 MiB for the allocator's rounding and the capture stream's cuBLAS workspace.
    Not measured on a GPU."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    itemsize = dtype.itemsize
    logits = tokens * text.vocab_size * (4 + itemsize)
    layer = tokens * (3 * text.intermediate_size + 8 * text.hidden_size) * itemsize
    return logits + layer + 64 * 2**20


def token_bucket(num_tokens: int, buckets: tuple[int, ...] = GRAPH_TOKEN_BUCKETS) -> int | None:
    """The smallest bucket holding ``num_tokens``; None past the largest."""
    i = bisect.bisect_left(buckets, num_tokens)
    return buckets[i] if i < len(buckets) else None


def table_width(width: int) -> int:
    """The block-table width a graph is captured for: the next power of two."""
    return 1 << (max(width, 1) - 1).bit_length()


def pad_step(inputs: StepInputs, tokens: int, width: int, null_block: int, block_size: int) -> StepInputs:
    """``inputs`` padded to ``tokens`` tokens and sequences, tables ``width`` wide and
    ``tokens`` sampled rows (see the module docstring); the real ones come first, unchanged."""
    num_tokens, num_seqs = len(inputs.input_ids), len(inputs.req_ids)
    pad = tokens - num_tokens  # padding sequences, one token each
    if pad < 0 or width < inputs.block_tables.shape[1]:
        raise ValueError(f"cannot pad a step of {num_tokens} tokens, width {inputs.block_tables.shape[1]}")
    empty = tokens - num_seqs - pad  # >= 0: every real sequence has at least one token

    def extend(values: np.ndarray, fill: int, count: int) -> np.ndarray:
        return np.concatenate([values, np.full(count, fill, dtype=values.dtype)])

    tables = np.full((tokens, width), null_block, dtype=inputs.block_tables.dtype)
    tables[:num_seqs, : inputs.block_tables.shape[1]] = inputs.block_tables
    cu, lens = inputs.cu_seqlens_q, inputs.seq_lens
    padding_ends = num_tokens + np.arange(1, pad + 1, dtype=cu.dtype)
    cu = np.concatenate([cu, padding_ends, np.full(empty, tokens, cu.dtype)])
    seq_lens = np.concatenate([lens, np.ones(pad, lens.dtype), np.zeros(empty, lens.dtype)])
    return StepInputs(
        req_ids=inputs.req_ids,
        input_ids=extend(inputs.input_ids, 0, pad),
        positions=extend(inputs.positions, 0, pad),
        slot_mapping=extend(inputs.slot_mapping, null_block * block_size, pad),
        cu_seqlens_q=cu,
        seq_lens=seq_lens,
        block_tables=tables,
        group_keys=extend(inputs.group_keys, -1, tokens - num_seqs),
        group_prefix_lens=extend(inputs.group_prefix_lens, 0, tokens - num_seqs),
        sample_rows=extend(inputs.sample_rows, 0, tokens - len(inputs.sample_rows)),
        sample_req_ids=inputs.sample_req_ids,
    )


@dataclass(frozen=True)
class DeviceStep:
    """A step's tensors on the device, as the runner's forward reads them."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    sample_rows: torch.Tensor  # (R,) int64
    state: Any  # the attention backend's build


@dataclass
class _Graph:
    inputs: tuple[torch.Tensor, ...]  # the captured step's tensors, refreshed before each replay
    replay: Forward


def cuda_graph_capture(forward: Forward, pool: Any) -> Forward:
    """Capture ``forward`` into a CUDA graph (launches recorded, nothing run); the replay
    runs them and returns the captured output tensor."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = forward()
    except BaseException:
        # A capture that fails in capture_end leaves its side stream current: every later
        # eager step would run there. Back to the stream the run was on.
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize()
        raise

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def rerun_capture(forward: Forward, pool: Any) -> Forward:
    """The CPU stand-in for a capture: a replay reruns ``forward`` on the captured tensors."""
    return forward


class StepGraphs:
    """The runner's graphs, keyed by padded shape and the backend's launch parameters."""

    def __init__(
        self,
        prepare: Callable[[StepInputs], DeviceStep],  # static-shape device step from padded inputs
        forward: Callable[[DeviceStep], torch.Tensor],  # -> logits (rows of sample_rows, vocab), model dtype
        backend: AttentionBackend,
        null_block: int,
        block_size: int,
        capture: Capture = cuda_graph_capture,
        buckets: tuple[int, ...] = GRAPH_TOKEN_BUCKETS,
        max_graphs: int = MAX_GRAPHS,
    ) -> None:
        self.prepare, self.forward, self.backend = prepare, forward, backend
        self.null_block, self.block_size = null_block, block_size
        self.capture, self.buckets, self.max_graphs = capture, buckets, max_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.sightings: Counter[tuple] = Counter()
        self.replays = 0  # steps run by a graph
        self.disabled: str | None = None  # why graphs were turned off (a host sync, a failed capture)
        self._pool: Any = None
        self._logits: torch.Tensor | None = None  # (max_tokens, vocab) float32: every graph's output

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """The step's logits (R, vocab), from a graph or a padded eager run; None when the
        step is too large for a graph (or graphs are off): the caller runs it as it is."""
        tokens = token_bucket(len(inputs.input_ids), self.buckets)
        if tokens is None or self.disabled:
            return None
        width = table_width(inputs.block_tables.shape[1])
        step = self.prepare(pad_step(inputs, tokens, width, self.null_block, self.block_size))
        graph_inputs = self.backend.graph_inputs(step.state)
        fresh = (step.input_ids, step.positions, step.sample_rows, *graph_inputs.tensors)
        key = (tokens, graph_inputs.key, *((t.shape, t.dtype) for t in fresh))
        num_rows = len(inputs.sample_rows)
        graph = self.graphs.get(key)
        if graph is None:
            self.sightings[key] += 1
            if self.sightings[key] == 1:
                return self._probed_forward(step)[:num_rows]  # padded, eager (compiles the kernels)
            if len(self.graphs) >= self.max_graphs:
                return None  # no room for another graph: the step runs as it is, unpadded
            graph = self._capture(key, step, fresh)
            if graph is None:
                return self.forward(step)[:num_rows].float()
        else:
            for static, new in zip(graph.inputs, fresh, strict=True):
                static.copy_(new, non_blocking=True)
        self.replays += 1
        return graph.replay()[:num_rows]

    def _probed_forward(self, step: DeviceStep) -> torch.Tensor:
        """The padded step's logits, eagerly; graphs off if its forward syncs with the host."""
        with HostSyncProbe() as probe:
            logits = self.forward(step)
        if probe.seen:
            ops = ", ".join(dict.fromkeys(probe.seen))
            self._disable(f"the model's forward syncs with the host ({ops}), which a graph cannot capture")
        return logits.float()

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        log.warning("CUDA graphs off for the rest of the run (%s); steps run eagerly", reason)

    def _capture(self, key: tuple, step: DeviceStep, fresh: tuple[torch.Tensor, ...]) -> _Graph | None:
        if self._pool is None and torch.cuda.is_available():
            self._pool = torch.cuda.graph_pool_handle()

        def forward() -> torch.Tensor:
            logits = self.forward(step)  # (tokens, vocab), model dtype; a temporary of the capture
            if self._logits is None or self._logits.shape[1:] != logits.shape[1:]:
                self._logits = logits.new_empty((self.max_tokens, *logits.shape[1:]), dtype=torch.float32)
            out = self._logits[: logits.shape[0]]
            out.copy_(logits)  # to float32 on the way, as the sampler reads it
            return out

        try:
            replay = self.capture(forward, self._pool)
        except Exception as error:  # noqa: BLE001 - any capture failure: fall back to eager steps
            self._disable(f"capture of a {key[0]}-token step failed: {type(error).__name__}: {error}")
            return None
        self.graphs[key] = graph = _Graph(fresh, replay)
        return graph

    def describe(self) -> str:
        return f"CUDA graphs for steps of up to {self.max_tokens} tokens"
