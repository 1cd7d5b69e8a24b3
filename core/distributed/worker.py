"""A scale-out worker: one device, one engine, the model loaded once; units in, rows out.

The class is plain Python (the driver makes it a Ray actor with ``ray.remote``), so it is
importable and testable without Ray. What crosses the process boundary pickles: the spec,
``Request`` objects as the plan made them (prompt ids, ``SamplingParams``, seed, segment refs,
prefix group) and ``Completion`` batches back.

Invariant: a ``Batch`` holds every sample of each row in it, so the driver journals whole rows
only, and a unit cut short by the worker's death leaves no half-finished row behind.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.stats import Completion, EngineInfo, EngineStats
from batchrun.core.sched.request import Request

FLUSH_SECONDS = 0.2  # finished rows go back at least this often while completions come


@dataclass(frozen=True)
class WorkerSpec:
    model: Path  # the checkpoint folder, at this path on every node
    device: str  # "cuda" (the one GPU Ray gave the actor) or "cpu"
    dtype: str
    engine: EngineConfig
    useful_tokens: int  # the job's most KV positions at once: caps the cache
    threads: int | None = None  # CPU workers: torch threads


@dataclass(frozen=True)
class WorkerInfo:
    engine: EngineInfo
    dtype_choice: str
    node: str
    pid: int
    load_s: float


@dataclass(frozen=True)
class Batch:
    completions: tuple[Completion, ...]  # every sample of each row in it
    stats: EngineStats  # the worker's engine counters so far (cumulative over its units)


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        start = time.perf_counter()
        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        from batchrun.core.api import load_engine

        self.engine, loaded = load_engine(
            spec.model, spec.engine, device=spec.device, dtype=spec.dtype, useful_tokens=spec.useful_tokens
        )
        self.info_ = WorkerInfo(
            self.engine.info,
            loaded.dtype_choice,
            socket.gethostname(),
            os.getpid(),
            time.perf_counter() - start,
        )

    def info(self) -> WorkerInfo:
        return self.info_

    def run(self, requests: list[Request]) -> Iterator[Batch]:
        """Run one unit; yield its finished rows in batches (the last one may be empty and
        carries the final counters)."""
        samples: dict[int, int] = {}
        for request in requests:
            samples[request.row] = samples.get(request.row, 0) + 1
        pending: dict[int, list[Completion]] = {}
        ready: list[Completion] = []
        flushed = time.monotonic()
        for completion in self.engine.generate(requests):
            done = pending.setdefault(completion.row, [])
            done.append(completion)
            if len(done) == samples[completion.row]:
                ready.extend(pending.pop(completion.row))
            if ready and time.monotonic() - flushed >= FLUSH_SECONDS:
                yield Batch(tuple(ready), dataclasses.replace(self.engine.stats))
                ready, flushed = [], time.monotonic()
        yield Batch(tuple(ready), dataclasses.replace(self.engine.stats))
