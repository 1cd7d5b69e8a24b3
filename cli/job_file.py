"""TOML job files: ``batchrun run nightly.toml``.

A job file holds the options of ``batchrun run`` under their long names (``max_tokens``,
``kv_memory``, ...), plus ``input``. Options given on the command line win over the file.
Relative paths are relative to the job file. An unknown key is an error naming the key.
"""

from __future__ import annotations

import sys
import typing
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import typer

from batchrun.cli.common import EXIT_INPUT, SAMPLING_OPTIONS, fail
from batchrun.core.errors import InputError
from batchrun.core.params import SamplingParams
from batchrun.core.sizes import parse_memory

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PATH_KEYS = ("input", "output", "model", "plan", "chat_template")


def is_job_file(path: Path) -> bool:
    return path.suffix == ".toml"


def read_job_file(path: Path, allowed: set[str]) -> dict[str, Any]:
    """The file's settings, keyed like ``run``'s parameters; paths resolved."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"job file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: not a readable TOML job file ({exc})") from None
    settings = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise InputError(
            f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"a job file may set: {', '.join(sorted(allowed))}"
        )
    if "input" not in settings:
        raise InputError(f"{path}: no 'input' key; name the prompt file to run")
    for key in PATH_KEYS:
        if key in settings:
            settings[key] = path.parent / Path(settings[key]).expanduser()
    return settings


def with_job_file(ctx: typer.Context, command: Any, options: dict[str, Any]) -> SimpleNamespace:
    """``command``'s options as attributes; when INPUT is a TOML job file, with its settings
    under the ones given on the command line."""
    if is_job_file(options["input"]):
        try:
            options = options | job_file_options(ctx, options["input"], command, options)
        except InputError as exc:
            raise fail(EXIT_INPUT, str(exc)) from None
    return SimpleNamespace(**options)


def job_file_options(ctx: typer.Context, path: Path, command: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The job file's settings that ``command`` takes and the command line does not override,
    typed and checked like the options (a bad value names the file: exit 2). A job file may
    hold any of ``run``'s options; ``plan`` and ``validate`` use those they share with it."""
    from batchrun.cli.run_command import run  # every command's job file is run's

    hints = typing.get_type_hints(command)
    chosen = {}
    for key, value in read_job_file(path, allowed=set(typing.get_type_hints(run)) - {"ctx"}).items():
        if key not in options:
            continue  # a run option another command does not take
        source = ctx.get_parameter_source(key)
        if key != "input" and getattr(source, "name", None) == "COMMANDLINE":
            continue
        try:
            chosen[key] = _checked_option(key, value, hints[key])
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: {key} = {value!r} is not valid ({exc})") from None
    return chosen


def _checked_option(key: str, value: Any, hint: Any) -> Any:
    """``value`` from a job file as option ``key`` of type ``hint`` would be, or an error."""
    kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    if isinstance(kind, type) and issubclass(kind, Enum):
        return kind(value)
    if kind is Path:
        return value  # read_job_file resolved it
    if key == "chat_template_kwargs" and isinstance(value, dict):
        return value  # a TOML table, as the option's JSON object
    if kind is bool and not isinstance(value, bool):
        raise TypeError("expected true or false")
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"expected {'an integer' if kind is int else 'a number'}")
    if kind is int and not isinstance(value, int):
        raise TypeError("expected an integer")
    if kind is str and not isinstance(value, str):
        raise TypeError("expected a string")
    if key in SAMPLING_OPTIONS:
        SamplingParams().with_overrides({key: value})
    elif key == "kv_memory":
        parse_memory(value)
    elif key == "max_error_rate" and not 0.0 <= value <= 1.0:
        raise ValueError("must be in [0, 1]")
    elif key in ("block_size", "token_budget", "top") and value < (0 if key == "top" else 1):
        raise ValueError(f"must be >= {0 if key == 'top' else 1}")
    return value
