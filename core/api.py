"""batchrun's Python API: the job ``batchrun run`` runs — read ▸ plan ▸ generate ▸ write,
with the journal, the lock and the report — for notebooks and pipelines, on one device or
scaled out over Ray workers. The CLI and the Ray driver and workers use these same calls.

    from batchrun.core import api

    summary = api.run("prompts.parquet", "./Qwen2.5-7B-Instruct", output="out.parquet",
                      sampling={"max_tokens": 256}, workers=4)
    report = api.plan("prompts.parquet", "./Qwen2.5-7B-Instruct", workers=4)
    engine, loaded = api.load_engine("./Qwen2.5-7B-Instruct")   # one level down

``run`` raises ``InputError`` (the file or model cannot be used; nothing was written),
``OutputLocked`` (another run holds the output) and, scaled out, ``NoWorkers`` (no worker
could start or every one died); rows finished before an error stay in the journal, and
calling ``run`` again resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchrun.core.distributed.cluster import NoWorkers
from batchrun.core.distributed.config import DistributedConfig
from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.engine import Engine, build_engine
from batchrun.core.errors import InputError
from batchrun.core.job.config import BUNDLED_MODEL, JobConfig, JobObserver, JobSummary
from batchrun.core.job.lock import OutputLocked
from batchrun.core.runner.model_loader import LoadedModel, load_model

__all__ = [
    "DistributedConfig",
    "EngineConfig",
    "InputError",
    "JobConfig",
    "JobObserver",
    "JobSummary",
    "NoWorkers",
    "OutputLocked",
    "load_engine",
    "plan",
    "run",
    "run_config",
]


def run(
    input: str | Path,
    model: str | Path = BUNDLED_MODEL,
    *,
    output: str | Path | None = None,
    sampling: dict[str, Any] | None = None,
    engine: EngineConfig | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    observer: JobObserver | None = None,
    **job: Any,
) -> JobSummary:
    """Run a whole job and return its summary. ``sampling`` holds job-wide ``SamplingParams``
    fields; ``job`` any other ``JobConfig`` field (``device``, ``dtype``, ``restart``, ...).
    ``workers`` or ``ray_address`` scale it out over Ray (``pip install batchrun[ray]``)."""
    distributed = None
    if workers is not None or ray_address is not None:
        distributed = DistributedConfig(workers=workers, address=ray_address)
    config = JobConfig(
        input=Path(input),
        model=Path(model),
        output=None if output is None else Path(output),
        sampling=sampling or {},
        engine=engine or EngineConfig(),
        distributed=distributed,
        **job,
    )
    return run_config(config, observer)


def run_config(config: JobConfig, observer: JobObserver | None = None) -> JobSummary:
    """Run the job ``config`` describes (what ``run`` and the CLI call)."""
    from batchrun.core.job.run import run_job

    return run_job(config, observer)


def plan(input: str | Path, model: str | Path = BUNDLED_MODEL, *, workers: int | None = None, **options):
    """Plan a job without running it (tokenizer and config only): a ``PlanReport`` with the
    saving, the LRU comparison and, with ``workers``, the split into work units and its
    expected balance. ``options`` are ``plan_job``'s (``sampling``, ``block_size``, ...)."""
    from batchrun.core.job.plan_command import plan_job

    report, _ = plan_job(Path(input), Path(model), workers=workers, **options)
    return report


def load_engine(
    model: str | Path,
    engine: EngineConfig | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    useful_tokens: int | None = None,
) -> tuple[Engine, LoadedModel]:
    """Load ``model`` once and build an engine on it; ``engine.generate(requests)`` yields each
    request's completion as it finishes (requests: ``core/job/requests.py``). Each scale-out
    worker holds one."""
    loaded = load_model(Path(model), device, dtype)
    return build_engine(loaded, engine or EngineConfig(), useful_tokens=useful_tokens), loaded
