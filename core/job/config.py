"""What a job is (``JobConfig``), what it reports while running (``JobObserver``) and what
it returns (``JobSummary``). Plain values: the CLI builds the config and renders the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchrun.core.engine.config import EngineConfig
from batchrun.core.job.rows import Columns, RowResult
from batchrun.core.planner.plan import ORDER_PLAN, PlanSummary

if TYPE_CHECKING:  # the engine imports torch; `batchrun --help` must not
    from batchrun.core.engine.engine import Engine, EngineStats

MAX_LISTED_PROBLEMS = 5


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
    order: str = ORDER_PLAN  # or ORDER_INPUT: file order (for comparison)


class JobObserver:
    """Receives progress; the default does nothing (the CLI subclasses it)."""

    def phase(self, name: str) -> None: ...

    def started(self, total_rows: int) -> None: ...

    def row_finished(self, result: RowResult) -> None: ...

    def engine_started(self, engine: Engine) -> None: ...


@dataclass
class JobSummary:
    input: Path
    output: Path
    rows: int
    failed: int
    resumed: int  # rows taken from the journal of an earlier run
    prompt_tokens: int
    output_tokens: int
    seconds: dict[str, float]  # per phase
    engine: EngineStats | None
    plan: PlanSummary
    errors: list[str]  # the first few row errors

    @property
    def ok(self) -> int:
        return self.rows - self.failed
