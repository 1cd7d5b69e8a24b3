"""Where a job's output goes: the path, the writer its name and the input call for, and
checks that it can be written (a regular file or folder we may replace) before any work."""

from __future__ import annotations

import os
from pathlib import Path

from batchrun.core.errors import InputError
from batchrun.core.job.config import JobConfig
from batchrun.core.job.io import (
    REWRITING_FORMATS,
    STDIO,
    STREAMABLE_FORMATS,
    OutputTarget,
    PromptSource,
    output_target,
)
from batchrun.core.job.io.convert import ARROW_FORMATS, output_kind
from batchrun.core.job.io.shards import ParquetShardsSource


def job_output(config: JobConfig, source: PromptSource) -> OutputTarget:
    """Where the output goes (``STDIO`` for stdout) and how it is written there (in the format
    its name says), refused if batchrun cannot write it there safely: see
    ``check_output_target``."""
    if config.in_place:
        if config.output is not None:
            raise InputError("use either --in-place or --output, not both")
        if config.input == STDIO:
            raise InputError("--in-place needs a file; stdin (-) cannot be replaced")
        if config.limit is not None:
            raise InputError("--in-place with --limit would cut the input down to its first rows; use -o")
        if isinstance(source, ParquetShardsSource):
            raise InputError(
                f"--in-place is not supported for Parquet shards ({config.input}); write them to "
                "another folder with -o FOLDER"
            )
        output = config.input
    elif config.output is not None:
        output = config.output
    else:
        output = STDIO if config.input == STDIO else source.default_output()
    if output == STDIO:
        if source.format_name not in STREAMABLE_FORMATS and source.format_name not in ARROW_FORMATS:
            raise InputError(f"-o - writes JSONL to stdout; {config.input} cannot be written as JSONL")
        return output_target(source, output)
    if source.format_name in REWRITING_FORMATS and _same_file(output, config.input):
        raise InputError(
            f"{output}: an OpenAI batch file's output is response lines, not requests, so it "
            "cannot replace its input (a second run would fail every row); write it elsewhere "
            "with -o responses.jsonl"
        )
    return check_output_target(output, source)


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def check_output_target(output: Path, source: PromptSource) -> OutputTarget:
    """Refuse outputs batchrun cannot replace atomically: a symbolic link (replacing it would
    replace the link, not write its target), a device, pipe or socket (``/dev/null``,
    ``/dev/stdout``), or a name saying a format the input cannot be written as."""
    if output.is_symlink():
        raise InputError(
            f"{output} is a symbolic link (to {os.readlink(output)}); batchrun replaces its output "
            "atomically, which would replace the link, not write through it. Pass the real path "
            f"(-o {output.resolve()}), or -o - to write JSONL to stdout"
        )
    folder_output = source.folder_output and output_kind(output) is None
    if output.exists() and not (output.is_dir() if folder_output else output.is_file()):
        kind = "a folder" if output.is_dir() else "not a regular file (a device, pipe or socket)"
        raise InputError(
            f"{output} is {kind}; batchrun writes its output as a new "
            f"{'folder' if folder_output else 'regular file'} and renames it into place. "
            "Pass another -o, or -o - to write JSONL to stdout"
        )
    return output_target(source, output)


def check_writable(output: Path) -> None:
    if output == STDIO:
        return
    folder = output.parent
    if not folder.is_dir():
        raise InputError(f"output folder {folder} does not exist; create it or pass -o elsewhere")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder {folder} is not writable; pass -o to a writable place")
