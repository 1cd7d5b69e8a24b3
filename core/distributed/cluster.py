"""Ray and the worker actors: join or start a cluster, one actor per worker, wait for each to
load its model, and report the ones that cannot start. Ray is imported here, lazily.

Placement: with GPUs in the cluster, each worker asks Ray for one GPU (Ray sets the actor's
``CUDA_VISIBLE_DEVICES``, so its ``cuda`` is its own device); without, each asks for its
share of the cluster's CPUs and runs that many torch threads.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from batchrun.core.distributed.config import DistributedConfig
from batchrun.core.distributed.stats import WorkerStats
from batchrun.core.distributed.worker import Worker, WorkerInfo, WorkerSpec
from batchrun.core.engine.config import EngineConfig
from batchrun.core.errors import InputError


class NoWorkers(RuntimeError):
    """No worker could start, or every one died: the journal keeps the finished rows."""


def import_ray():
    """The ``ray`` module, or an ``InputError`` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("scaling out needs Ray: pip install 'batchrun[ray]' (or --workers 1)") from None
    return ray


@dataclass
class WorkerHandle:
    actor: Any  # the Ray actor handle
    stats: WorkerStats
    info: WorkerInfo | None = None


@dataclass
class Cluster:
    """The job's workers. A worker is *starting* until its model has loaded (its ``info`` ref
    is in ``starting``), then ready until it dies or the job ends. Workers join as they load:
    the job runs once one is ready, and one still loading at ``deadline`` is given up."""

    workers: list[WorkerHandle]  # every worker asked for
    device: str  # "cuda" or "cpu"
    owns_ray: bool  # this job started Ray (and shuts it down)
    observer: Any
    starting: dict = field(default_factory=dict)  # info ref -> worker still loading its model
    deadline: float = 0.0  # time.monotonic() by which a starting worker must be ready
    asked: float = 0.0  # time.monotonic() when the workers were asked for

    @property
    def live(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.stats.state in ("ready", "done")]

    def started(self, ref) -> WorkerHandle | None:
        """A starting worker's ``info`` came back: the worker if it loaded, else None (reported)."""
        worker = self.starting.pop(ref)
        stats = worker.stats
        try:
            worker.info = info = import_ray().get(ref)
        except Exception as exc:  # noqa: BLE001 (the actor's own error, reported)
            stats.state, stats.error = "not started", _cause(exc)
            self.observer.phase(f"worker {stats.name} could not start: {stats.error}")
            return None
        stats.state, stats.node, stats.pid, stats.load_s = "ready", info.node, info.pid, info.load_s
        stats.device = info.engine.device
        self.observer.phase(
            f"worker {stats.name} ready on {stats.node} ({stats.device}, {stats.load_s:.1f}s)"
        )
        return worker

    def give_up(self, why: str) -> None:
        """Stop waiting for the workers still starting (killed, reported as not started)."""
        for worker in self.starting.values():
            worker.stats.state, worker.stats.error = "not started", why
            import_ray().kill(worker.actor)
            self.observer.phase(f"worker {worker.stats.name} could not start: {why}")
        self.starting.clear()

    def wait_for_one(self) -> None:
        """Wait until a worker is ready, or none is left starting (``NoWorkers`` then)."""
        ray = import_ray()
        while not self.live and self.starting:
            left = self.deadline - time.monotonic()
            ready, _ = ray.wait(list(self.starting), num_returns=1, timeout=max(left, 0))
            if not ready:
                self.give_up(f"not ready after {self.deadline - self.asked:.0f}s (no free device?)")
            for ref in ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)[0]:
                self.started(ref)
        self.observer.workers([w.stats for w in self.workers])
        if not self.live:
            self.close()
            reasons = "; ".join(f"{w.stats.name}: {w.stats.error}" for w in self.workers)
            raise NoWorkers(f"no worker could start ({reasons})")

    def close(self) -> None:
        ray = import_ray()
        for worker in self.workers:
            try:
                ray.kill(worker.actor)
            except Exception:  # noqa: BLE001 (already gone)
                pass
        if self.owns_ray:
            ray.shutdown()


def connect(config: DistributedConfig) -> bool:
    """Join ``config.address`` (or start Ray here) unless this process already did; whether
    this call started it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    ray.init(
        address=config.address,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return True


def plan_workers(config: DistributedConfig, device: str) -> tuple[int, str, int | None]:
    """(workers, device, torch threads per CPU worker) for the cluster Ray sees."""
    ray = import_ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and not gpus:
        raise InputError("--device cuda was asked for, but the Ray cluster has no GPU")
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    workers = config.workers or (gpus if device == "cuda" else max(nodes, 1))
    threads = None
    if device == "cpu":
        threads = config.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // workers)
    return workers, device, threads


def start_workers(
    config: DistributedConfig,
    model,
    device: str,
    dtype: str,
    engine: EngineConfig,
    useful_tokens: int,
    observer,
) -> Cluster:
    """Ask for the workers and wait until one has loaded (the others join as they load);
    ``NoWorkers`` if none could."""
    owns_ray = connect(config)
    try:
        count, device, threads = plan_workers(config, device)
        ray = import_ray()
        spec = WorkerSpec(model, device, dtype, engine, useful_tokens, threads)
        resources = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": threads}
        job = uuid.uuid4().hex[:8]
        remote = ray.remote(Worker)
        workers = []
        for i in range(count):
            name = f"batchrun-{job}-w{i}"
            actor = remote.options(name=name, max_restarts=0, **resources).remote(spec)
            workers.append(WorkerHandle(actor, WorkerStats(name, device=device)))
        observer.phase(
            f"starting {count} Ray worker(s) ({device}" + (f", {threads} threads each)" if threads else ")")
        )
        now = time.monotonic()
        starting = {w.actor.info.remote(): w for w in workers}
        cluster = Cluster(workers, device, owns_ray, observer, starting, now + config.start_timeout_s, now)
    except BaseException:
        if owns_ray:
            import_ray().shutdown()
        raise
    cluster.wait_for_one()
    return cluster


def _cause(exc: BaseException) -> str:
    """The last line of what went wrong inside an actor (Ray wraps it in a long message whose
    last line, when ``__init__`` raised, is that exception: ``...InputError: <message>``)."""
    lines = str(exc).strip().splitlines()
    last = lines[-1].strip() if lines else ""
    return last if getattr(exc, "actor_init_failed", False) else f"{type(exc).__name__}: {last}"
