"""How a job scales out: a frozen, validated config the CLI (or a Python caller) builds.

Plain values only and no Ray import, so ``JobConfig`` can carry it on machines without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DistributedConfig:
    # Workers, one engine each. None: one per GPU of the cluster, else one per node.
    workers: int | None = None
    # An existing Ray cluster ("auto", "ray://head:10001", "head:6379"); None starts Ray on
    # this machine (or joins the one ``ray start`` runs here).
    address: str | None = None
    # CPU workers: torch threads (and Ray CPUs) per worker; None shares the cluster's CPUs.
    cpus_per_worker: int | None = None
    # A worker not ready this long after the job asked for it (no free device, a slow or
    # failing model load) is reported as unable to start and the job goes on without it.
    start_timeout_s: float = 900.0
    # A unit whose worker dies is queued again; one that killed this many workers fails the job.
    max_unit_attempts: int = 3

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ValueError(f"CPUs per worker must be >= 1, got {self.cpus_per_worker}")
        if self.start_timeout_s <= 0 or self.max_unit_attempts < 1:
            raise ValueError("start timeout must be > 0 and unit attempts >= 1")
