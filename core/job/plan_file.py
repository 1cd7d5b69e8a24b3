"""Save a plan as JSON (``batchrun plan --save``) and load it back for ``batchrun run --plan``.

A plan is only valid for the exact tokens it was made from, so the file records their
digest (input content and tokenizer together), and loading refuses a plan whose digest,
runnable rows or block size differ from the job at hand, saying how to make a fresh one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from batchrun.core.errors import InputError
from batchrun.core.job.io.atomic import atomic_file
from batchrun.core.planner.plan import Plan, PlanSummary
from batchrun.core.planner.prefix_tree import SegmentTree
from batchrun.core.planner.prompt_tokens import PromptTokens

FORMAT_VERSION = 1
SEGMENT_FIELDS = ("parent", "start", "end", "users", "depth", "first_row")


def plan_to_dict(plan: Plan, input: Path, model: str) -> dict:
    tree = plan.tree
    return {
        "batchrun_plan": FORMAT_VERSION,
        "input": str(input),
        "model": model,
        "tokens_digest": plan.tokens_digest,
        "order_kind": plan.order_kind,
        "summary": plan.summary.to_dict(),
        "order": plan.order.tolist(),
        "row_segment": tree.row_segment.tolist(),
        "segments": {name: getattr(tree, name).tolist() for name in SEGMENT_FIELDS},
        "group_of_segment": plan.group_of_segment.tolist(),
    }


def save_plan(plan: Plan, path: Path, input: Path, model: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(plan_to_dict(plan, input, model)))


def load_plan(path: Path, prompts: PromptTokens, runnable: np.ndarray, block_size: int) -> Plan:
    """Read a saved plan and check it was made for these prompts; ``InputError`` if not."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no plan file {path}; make it with `batchrun plan INPUT --save`") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a readable plan file ({exc})") from None
    if not isinstance(data, dict) or data.get("batchrun_plan") != FORMAT_VERSION:
        raise InputError(f"{path} is not a batchrun plan (version {FORMAT_VERSION})")
    try:
        return _checked_plan(data, path, prompts, runnable, block_size)
    except (KeyError, TypeError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        raise InputError(f"{path} is a damaged plan file ({problem}); make a new one") from None


def _checked_plan(
    data: dict, path: Path, prompts: PromptTokens, runnable: np.ndarray, block_size: int
) -> Plan:
    redo = f"make a new one with `batchrun plan INPUT --model MODEL --save {path}`"
    if data["tokens_digest"] != prompts.digest():
        raise InputError(
            f"{path} was planned for other prompts or another tokenizer "
            f"(input {data['input']}, model {data['model']}); {redo}"
        )
    summary = PlanSummary(**{k: v for k, v in data["summary"].items() if k != "saving"})
    if summary.block_size != block_size:
        raise InputError(
            f"{path} was planned with --block-size {summary.block_size}, this run uses {block_size}; "
            f"pass --block-size {summary.block_size} or {redo}"
        )
    order = np.asarray(data["order"], dtype=np.int64)
    if not np.array_equal(np.sort(order), np.flatnonzero(runnable)):
        raise InputError(
            f"{path} schedules a different set of rows than this run can run "
            f"(did max_tokens or the model's context change?); {redo}"
        )
    tree = SegmentTree(
        block_size=block_size,
        row_segment=np.asarray(data["row_segment"], dtype=np.int64),
        **{name: np.asarray(data["segments"][name], dtype=np.int64) for name in SEGMENT_FIELDS},
    )
    return Plan(
        tree=tree,
        order=order,
        group_of_segment=np.asarray(data["group_of_segment"], dtype=np.int64),
        summary=summary,
        tokens_digest=data["tokens_digest"],
        order_kind=data["order_kind"],
    )
