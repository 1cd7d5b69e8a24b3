"""TOML job files: ``batchrun run nightly.toml``.

A job file holds the options of ``batchrun run`` under their long names (``max_tokens``,
``kv_memory``, ...), plus ``input``. Options given on the command line win over the file.
Relative paths are relative to the job file. An unknown key is an error naming the key.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from batchrun.core.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PATH_KEYS = ("input", "output", "model", "plan")


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
