"""The job's plan: loaded from ``--plan`` (checked against the tokens) or built from the
runnable rows and their output estimates."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from batchrun.core.job.config import JobConfig
from batchrun.core.job.plan_file import load_plan
from batchrun.core.job.rows import Row
from batchrun.core.planner.plan import Plan, build_plan
from batchrun.core.planner.prompt_tokens import PromptTokens


def runnable_mask(rows: list[Row]) -> np.ndarray:
    return np.fromiter((row.error is None for row in rows), dtype=bool, count=len(rows))


def expected_output_tokens(rows: list[Row]) -> np.ndarray:
    """Each row's output-length estimate for the plan: its hint, else its ``max_tokens``."""

    def estimate(row: Row) -> int:
        if row.error:
            return 0
        return row.expected_tokens if row.expected_tokens is not None else row.params.max_tokens

    return np.fromiter(map(estimate, rows), dtype=np.int64, count=len(rows))


def make_plan(config: JobConfig, rows: list[Row], prompts: PromptTokens, skip: Collection[int] = ()) -> Plan:
    """The job's plan: loaded from ``config.plan_file`` (checked against the input), or built.
    Rows in ``skip`` (resumed from the journal) are left out."""
    runnable = runnable_mask(rows)
    if config.plan_file is not None:
        plan = load_plan(config.plan_file, prompts, runnable, config.engine.block_size)
        return plan.without(set(skip))
    runnable[list(skip)] = False
    return build_plan(
        prompts,
        runnable,
        expected_output_tokens(rows),
        config.engine.block_size,
        sharing=config.prefix_sharing,
        order=config.order,
    )
