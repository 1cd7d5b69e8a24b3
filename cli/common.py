"""What every command shares: exit codes, consoles, option types, messages.

Exit codes:
  0  every row finished
  1  usage error (bad option or value)
  2  invalid input file or model: nothing was run, nothing written
  3  finished, but more rows failed than --max-error-rate allows (see .<output>.errors.jsonl)
  4  engine failure (the journal keeps every finished row; run again to resume)
  75 the output is locked by another run
  130 interrupted (Ctrl-C); the journal keeps every finished row: run again to resume
"""

from __future__ import annotations

import json
import logging
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from batchrun.core.params import ParamError, SamplingParams
from batchrun.core.planner.plan import ORDER_INPUT, ORDER_PLAN

# "\b" keeps click from re-flowing the exit-code table into one paragraph.
EXIT_CODES_HELP = "\b\nExit codes:\n" + __doc__.split("Exit codes:\n", 1)[1]
EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_ROWS_FAILED, EXIT_ENGINE, EXIT_LOCKED = 0, 1, 2, 3, 4, 75
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT, as shells report it

out = Console()
err = Console(stderr=True)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Order(str, Enum):
    plan = ORDER_PLAN
    input = ORDER_INPUT


class Backend(str, Enum):
    auto = "auto"
    cpu = "cpu"
    flash = "flash"
    torch = "torch"
    triton = "triton"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


ModelOpt = Annotated[
    Path,
    typer.Option(help="Local Hugging Face checkpoint folder. Default: the bundled tiny sample model."),
]
PromptColumn = Annotated[str, typer.Option(help="Field holding a raw text prompt.")]
MessagesColumn = Annotated[str, typer.Option(help="Field holding a chat (list of {role, content}).")]
IdColumn = Annotated[str, typer.Option(help="Field holding the row id (default: the row number).")]
ChatTemplate = Annotated[
    Path | None,
    typer.Option(help="Jinja chat template file for chat rows, instead of the tokenizer's own."),
]
ChatTemplateKwargs = Annotated[
    str | None,
    typer.Option(help="JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}'."),
]
Limit = Annotated[
    int | None,
    typer.Option(min=1, help="Only the first N rows (a smoke test); the output has those N rows."),
]
OutputPrefix = Annotated[
    str,
    typer.Option(
        help="Prefix for the columns batchrun adds (output, error, ...), e.g. gen_ when the input "
        "already has an 'output' column of its own."
    ),
]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("batchrun")
    except PackageNotFoundError:  # pragma: no cover (running from a bare checkout)
        return "unknown"


def quiet_libraries() -> None:
    """batchrun reports progress itself: silence transformers' and datasets' own bars and
    info logs. Imports transformers, so only commands that need the model call it."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("ray").setLevel(logging.ERROR)  # scale-out: Ray's start-up notices


def fail(code: int, message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def sampling_overrides(**values: Any) -> dict[str, Any]:
    """The job-wide sampling options the user set, validated (so a typo fails in a second)."""
    chosen = {k: v for k, v in values.items() if v is not None}
    try:
        SamplingParams().with_overrides(chosen)
    except ParamError as exc:
        raise fail(EXIT_USAGE, str(exc)) from None
    return chosen


SAMPLING_OPTIONS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "stop",
    "stop_token_ids",
    "n",
    "logprobs",
)


def read_chat_template(path: Path | None) -> str | None:
    """The Jinja text of ``--chat-template FILE``; a file that cannot be read is a usage error."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(EXIT_USAGE, f"--chat-template {path}: cannot read it ({exc})") from None


def parse_template_kwargs(text: str | dict | None) -> dict[str, Any]:
    """``--chat-template-kwargs '{"enable_thinking": false}'`` as a dict (a job file may give a
    table); anything but a JSON object is a usage error."""
    if text is None:
        return {}
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        raise fail(EXIT_USAGE, f"--chat-template-kwargs must be a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise fail(EXIT_USAGE, f"--chat-template-kwargs must be a JSON object, got {text!r}")
    return value
