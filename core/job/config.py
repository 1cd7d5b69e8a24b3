"""What a job is (``JobConfig``), what it reports while running (``JobObserver``) and what
it returns (``JobSummary``). Plain values: the CLI builds the config and renders the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchrun.core.distributed.config import DistributedConfig
from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.stats import EngineInfo, EngineStats
from batchrun.core.job.rows import Columns, RowResult
from batchrun.core.planner.plan import ORDER_PLAN, PlanSummary

MAX_LISTED_PROBLEMS = 5
# The random-weight demo checkpoint shipped with the sample jobs (the default --model).
SAMPLE_JOBS = Path(__file__).resolve().parents[2] / "sample_jobs"
BUNDLED_MODEL = SAMPLE_JOBS / "models" / "tiny-llama"


@dataclass(frozen=True)
class JobConfig:
    input: Path
    model: Path
    output: Path | None = None  # None: <input stem>.out.<ext> beside the input
    in_place: bool = False
    columns: Columns = Columns()
    sampling: dict[str, Any] = field(default_factory=dict)  # job-wide overrides set by the user
    seed: int = 0  # job seed: rows without their own seed derive one from it and their id
    device: str = "auto"
    dtype: str = "auto"
    engine: EngineConfig = EngineConfig()
    strict: bool = False  # refuse the whole file if any row is invalid
    plan_file: Path | None = None  # a plan saved by `batchrun plan --save` (checked against the input)
    prefix_sharing: bool = True  # False: compute every prompt in full (for comparison)
    restart: bool = False  # discard the journal of an earlier, unfinished run
    chat_template: str | None = None  # Jinja text replacing the tokenizer's chat template
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"enable_thinking": False}
    order: str = ORDER_PLAN  # or ORDER_INPUT: file order (for comparison)
    limit: int | None = None  # run only the first N rows (a smoke test); the output has N rows
    distributed: DistributedConfig | None = None  # scale out over Ray workers (core/distributed)


@dataclass(frozen=True)
class StepStats:
    """A snapshot of the engine's counters after a step (plain values, for progress)."""

    prefill_tokens: int = 0  # prompt positions computed so far
    decode_tokens: int = 0  # output positions computed so far
    steps: int = 0
    kv_blocks_used: int = 0
    kv_blocks: int = 0
    live_saving: float = 0.0  # share of finished rows' prompt tokens read from shared blocks
    output_tokens: int = 0  # output tokens sampled so far (with max_tokens 1: one per row, no decode)


@dataclass(frozen=True)
class RunInfo:
    """What runs: echoed when generation starts and kept in the report."""

    model: str  # the checkpoint folder
    architecture: str
    device: str
    dtype: str
    sampling: str  # the job's sampling defaults, e.g. "greedy" or "temperature=0.7 top_p=0.9"
    max_tokens: int
    kv_blocks: int
    block_size: int
    kv_bytes: int
    bundled_model: bool = False  # the random-weight demo model: output is gibberish
    attention: str = ""  # the attention backend
    dtype_choice: str = ""  # why that dtype, e.g. "auto: the checkpoint's bfloat16"
    attention_choice: str = ""  # why that backend, e.g. "auto: the torch reference on cpu"

    def line(self) -> str:
        kv = f"{self.kv_blocks} blocks x {self.block_size} tokens ({self.kv_bytes / 2**20:,.1f} MiB)"
        return (
            f"model={self.model} ({self.architecture}) device={self.device} dtype={self.dtype} "
            f"attention={self.attention} sampling={self.sampling} max_tokens={self.max_tokens} kv={kv}"
        )

    def reasons(self) -> str:
        return f"dtype {self.dtype_choice}; attention {self.attention_choice}"


class JobObserver:
    """Receives progress; the default does nothing (the CLI subclasses it)."""

    def phase(self, name: str) -> None: ...

    def tokenized(self, done: int, total: int) -> None:
        """``done`` of ``total`` rows are tokenized (after every chunk; ``total`` is 0 while
        rows are tokenized as they are read; ``done == total`` at the end, also when the ids
        came from the token cache)."""

    def started(self, total_rows: int, prompt_tokens: int = 0, expected_output_tokens: int = 0) -> None:
        """Generation starts: the plan's prompt tokens to compute and its output estimate
        (``expected_tokens`` or ``max_tokens`` per row; rows may stop early) for the rows to
        generate."""

    def run_info(self, info: RunInfo) -> None: ...

    def step(self, stats: StepStats) -> None:
        """After an engine step."""

    def row_finished(self, result: RowResult) -> None: ...

    def rows_resumed(self, count: int) -> None:
        """``count`` rows were taken from an earlier run's journal (not generated now)."""

    def stopped(self, journaled_rows: int, journal: Path | None) -> None:
        """The job stopped early (engine failure, Ctrl-C); ``journaled_rows`` finished rows
        are kept in ``journal`` for the next run of the same command."""

    def engine_started(self, info: EngineInfo) -> None: ...

    def workers(self, workers: list) -> None:
        """Scaled out: each worker's ``WorkerStats`` (core/distributed/stats.py), after a
        worker starts, returns finished rows, finishes a unit or dies."""


@dataclass
class JobSummary:
    input: Path
    output: Path
    rows: int
    failed: int
    resumed: int  # rows taken from the journal of an earlier run
    prompt_tokens: int
    output_tokens: int  # of every row, resumed ones included
    generated_output_tokens: int  # generated by this run (its throughput)
    seconds: dict[str, float]  # per phase
    engine: EngineStats | None
    plan: PlanSummary
    errors: list[str]  # the first few row errors
    errors_file: Path | None = None  # every failed row, when there are any

    @property
    def ok(self) -> int:
        return self.rows - self.failed
