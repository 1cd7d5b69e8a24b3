"""What a distributed run counts: per worker, and the engine counters summed over workers.

``ClusterStats`` is an ``EngineStats``, so the summary, the report and progress take it
unchanged; its ``workers`` add the per-worker rows (rows, tokens/s, assigned cost).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from batchrun.core.engine.stats import EngineStats

# Counters summed over workers; the others are maxima (peaks, wall time) or taken as is.
_SUMMED = (
    "requests",
    "prompt_tokens",
    "prefill_tokens",
    "decode_tokens",
    "sampled_tokens",
    "cached_prompt_tokens",
    "finished_prompt_tokens",
    "steps",
    "preemptions",
    "num_blocks",
    "kv_blocks_used",
    "graph_steps",
    "cuda_graphs",
)


@dataclass
class WorkerStats:
    name: str  # the worker's Ray actor name (unique per job)
    state: str = "starting"  # starting | ready | done | died | not started
    node: str = ""  # host name
    pid: int = 0
    device: str = ""
    error: str | None = None  # why it died or could not start
    load_s: float = 0.0  # model load and engine build
    units: int = 0  # work units finished
    rows: int = 0  # rows it returned (journaled by the driver)
    assigned_cost: int = 0  # estimated tokens of the units it was given (split.py's cost)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    busy_s: float = 0.0  # time with a unit in flight, seen from the driver

    @property
    def tokens_per_s(self) -> float:
        return (self.prefill_tokens + self.decode_tokens) / self.busy_s if self.busy_s else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"tokens_per_s": self.tokens_per_s}


@dataclass
class ClusterStats(EngineStats):
    workers: list[WorkerStats] = field(default_factory=list)
    units: int = 0  # work units the plan was cut into
    requeued_units: int = 0  # units given again after their worker died
    split_computed_tokens: int = 0  # prompt tokens the split expects to compute (all units)

    @classmethod
    def combine(cls, snapshots: list[EngineStats], seconds: float, **extra) -> ClusterStats:
        """The workers' latest engine counters summed (peak blocks: the largest), over
        ``seconds`` of wall time."""
        stats = cls(seconds=seconds, **extra)
        for snap in snapshots:
            for name in _SUMMED:
                setattr(stats, name, getattr(stats, name) + getattr(snap, name))
            stats.peak_blocks = max(stats.peak_blocks, snap.peak_blocks)
            stats.block_size = snap.block_size
        return stats

    def to_dict(self) -> dict:
        base = {f.name: getattr(self, f.name) for f in fields(EngineStats)}
        derived = EngineStats.to_dict(EngineStats(**base))
        return derived | {
            "workers": [w.to_dict() for w in self.workers],
            "units": self.units,
            "requeued_units": self.requeued_units,
            "split_computed_tokens": self.split_computed_tokens,
        }
