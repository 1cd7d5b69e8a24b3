"""The Ray driver: a ``CompletionSource`` whose completions come from worker actors.

The driver has read, tokenized and planned the job (core/job, as in one process). Here the
plan's rows are cut into work units (split.py) and queued longest first; each idle worker
pulls the next unit and streams its finished rows back; ``generate`` (core/job/generate.py)
journals each row as it arrives and the output is written in row order at the end.

Invariants:
* a unit is in flight on at most one worker, and a row is yielded at most once (``done``);
* a worker that dies (killed, node lost, out of memory) takes only its unit's unreturned rows
  with it: they are queued again, first, as a smaller unit; its returned rows are journaled;
* the job fails (``NoWorkers``, exit 4, journal kept) only when no worker is left with work
  queued, or a unit has killed ``max_unit_attempts`` workers;
so with any worker alive the job ends with every planned row exactly once.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from batchrun.core.distributed.cluster import Cluster, NoWorkers, WorkerHandle, import_ray, start_workers
from batchrun.core.distributed.split import Split, split_plan
from batchrun.core.distributed.stats import ClusterStats
from batchrun.core.engine.stats import Completion, EngineInfo, EngineStats
from batchrun.core.job.completion_source import OnStep, SegmentUsers
from batchrun.core.job.config import JobConfig, JobObserver
from batchrun.core.job.planning import expected_output_tokens
from batchrun.core.job.report import RunReport
from batchrun.core.job.rows import Row
from batchrun.core.planner.plan import Plan
from batchrun.core.planner.prompt_tokens import PromptTokens
from batchrun.core.sched.request import Request


def row_decode_tokens(rows: list[Row]) -> np.ndarray:
    """Expected output tokens of each row over its ``n`` samples (0 for error rows)."""
    samples = np.fromiter(
        (row.params.n if row.params else 0 for row in rows), dtype=np.int64, count=len(rows)
    )
    return expected_output_tokens(rows) * samples


REPORT_EVERY_S = 10.0  # the report gets the workers' stats after each unit and at least this often


class RaySource:
    def __init__(
        self,
        config: JobConfig,
        rows: list[Row],
        prompts: PromptTokens,
        plan: Plan,
        observer: JobObserver,
        report: RunReport | None = None,
    ) -> None:
        assert config.distributed is not None
        self.config, self.plan, self.observer, self.report = config, plan, observer, report
        self.lengths, self.decode = prompts.lengths, row_decode_tokens(rows)
        self.cluster: Cluster | None = None
        self.split: Split | None = None
        self.dtype_choice = ""
        self._snapshots: dict[int, EngineStats] = {}
        self._started = time.perf_counter()
        self._requeued = 0
        self._reported = time.monotonic()  # when the report last got the workers' stats

    def start(self, useful_tokens: int) -> EngineInfo:
        c = self.config
        self.cluster = start_workers(
            c.distributed, c.model, c.device, c.dtype, c.engine, useful_tokens, self.observer
        )
        live = self.cluster.live
        infos = [w.info.engine for w in live]
        self.dtype_choice = live[0].info.dtype_choice
        smallest = min(infos, key=lambda info: info.num_blocks)
        return EngineInfo(
            device=f"{len(self.cluster.workers)} Ray workers ({self.cluster.device})",
            dtype=smallest.dtype,
            attention_backend=smallest.attention_backend,
            attention_backend_choice=smallest.attention_backend_choice,
            block_size=smallest.block_size,
            num_blocks=smallest.num_blocks,
            kv_cache_bytes=sum(i.kv_cache_bytes for i in infos),
            token_budget=smallest.token_budget,
        )

    @property
    def device(self) -> str:
        """For the report: how many workers ran, on what."""
        if self.cluster is None:
            return "ray"
        return f"ray: {len(self.cluster.live)} x {self.cluster.device}"

    @property
    def stats(self) -> ClusterStats:
        return ClusterStats.combine(
            list(self._snapshots.values()),
            time.perf_counter() - self._started,
            workers=[w.stats for w in self.cluster.workers] if self.cluster else [],
            units=len(self.split.units) if self.split else 0,
            requeued_units=self._requeued,
            split_computed_tokens=self.split.computed_tokens if self.split else 0,
        )

    def generate(
        self,
        requests: Iterable[Request],
        on_step: OnStep | None = None,
        segment_users: SegmentUsers | None = None,
    ) -> Iterator[Completion]:
        """Every request, sent to the workers unit by unit. All requests are taken at once (the
        units are cut from the whole plan); each worker's engine counts its own segment users,
        so ``segment_users`` is not needed here."""
        assert self.cluster is not None, "start() first"
        try:
            yield from self._generate(requests, on_step)
        finally:
            self.cluster.close()

    def _generate(self, requests: Iterable[Request], on_step: OnStep | None) -> Iterator[Completion]:
        ray = import_ray()
        from ray.exceptions import RayActorError, WorkerCrashedError

        cluster = self.cluster
        self._started = time.perf_counter()
        by_row: dict[int, list[Request]] = collections.defaultdict(list)
        for request in requests:
            by_row[request.row].append(request)
        workers = len(cluster.live) + len(cluster.starting)  # those still loading join later
        self.split = split_plan(self.plan, self.lengths, self.decode, workers)
        queue = collections.deque(Unit(u.rows.tolist(), u.cost) for u in self.split.units)
        done: set[int] = set()  # rows yielded
        idle: list[WorkerHandle] = list(cluster.live)
        in_flight: dict = {}  # stream -> (worker, unit, started)
        while queue or in_flight:
            while idle and queue:  # each idle worker pulls the next unit (longest first)
                unit = queue.popleft()
                unit.rows = [r for r in unit.rows if r not in done]
                if not unit.rows:
                    continue
                worker = idle.pop(0)
                stream = worker.actor.run.remote([req for r in unit.rows for req in by_row[r]])
                worker.stats.assigned_cost += unit.cost
                in_flight[stream] = (worker, unit, time.perf_counter())
            if not in_flight:
                if not queue:  # the last queued units had all come back already
                    break
                if not cluster.starting:
                    left = sum(len(unit.rows) for unit in queue)
                    raise NoWorkers(
                        f"every worker died; {left} row(s) not generated (the journal keeps the rest)"
                    )
            timeout = max(cluster.deadline - time.monotonic(), 0) if cluster.starting else None
            ready, _ = ray.wait([*in_flight, *cluster.starting], num_returns=1, timeout=timeout)
            if not ready:  # only workers still loading, past the deadline
                cluster.give_up(f"not ready after {cluster.deadline - cluster.asked:.0f}s (no free device?)")
                continue
            if ready[0] in cluster.starting:  # a worker finished loading: it joins
                if (joined := cluster.started(ready[0])) is not None:
                    idle.append(joined)
                self._show_workers(report=True)
                continue
            stream = ready[0]
            worker, unit, started = in_flight[stream]
            try:
                batch = ray.get(next(stream))
            except (StopIteration, RayActorError, WorkerCrashedError) as exc:
                del in_flight[stream]
                worker.stats.busy_s += time.perf_counter() - started
                unit.rows = [r for r in unit.rows if r not in done]
                if isinstance(exc, StopIteration):
                    worker.stats.units += 1
                    idle.append(worker)
                    if unit.rows:  # a worker must return every row; never drop one
                        queue.appendleft(unit)
                else:
                    queue.appendleft(self._lost(worker, unit, exc))
                self._show_workers(report=True)
                continue
            self._snapshots[id(worker)] = batch.stats
            worker.stats.prefill_tokens = batch.stats.prefill_tokens
            worker.stats.decode_tokens = batch.stats.decode_tokens
            fresh = [c for c in batch.completions if c.row not in done]
            worker.stats.rows += len({c.row for c in fresh})
            done.update(c.row for c in fresh)
            yield from fresh
            if on_step is not None:
                on_step(self.stats)
            self._show_workers(report=time.monotonic() - self._reported >= REPORT_EVERY_S)
        cluster.give_up("still loading when the job finished")
        for worker in cluster.live:
            worker.stats.state = "done"

    def _show_workers(self, report: bool) -> None:
        """Workers' stats to the observer; with ``report``, also into the run report, which
        ``batchrun status`` reads while the job runs."""
        workers = self.cluster.workers
        self.observer.workers([w.stats for w in workers])
        if report and self.report is not None:
            self.report.workers([w.stats.to_dict() for w in workers])
            self._reported = time.monotonic()

    def _lost(self, worker: WorkerHandle, unit: Unit, exc: Exception) -> Unit:
        """A worker died with ``unit`` in flight: its unreturned rows, to queue again."""
        worker.stats.state, worker.stats.error = "died", (str(exc).strip().splitlines() or [""])[0]
        self.observer.phase(
            f"worker {worker.stats.name} died; its {len(unit.rows)} unfinished row(s) are queued again"
        )
        unit.attempts += 1
        if unit.attempts >= self.config.distributed.max_unit_attempts:
            raise NoWorkers(f"a unit of {len(unit.rows)} row(s) killed {unit.attempts} workers; last: {exc}")
        self._requeued += 1
        return unit


@dataclass
class Unit:
    """A work unit in the driver's queue: its rows not yet returned, in plan order."""

    rows: list[int]
    cost: int  # split.py's estimate, for the workers' assigned cost
    attempts: int = 0  # workers that died running it
