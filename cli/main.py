"""The ``batchrun`` command line. It builds typed configs and renders; the core does the work."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.exceptions import TyperException

from batchrun.cli.common import (
    EXIT_CODES_HELP,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_ROWS_FAILED,
    EXIT_USAGE,
    ChatTemplate,
    ChatTemplateKwargs,
    IdColumn,
    Limit,
    MessagesColumn,
    ModelOpt,
    OutputPrefix,
    PromptColumn,
    err,
    fail,
    out,
    parse_template_kwargs,
    quiet_libraries,
    read_chat_template,
    sampling_overrides,
    version,
)
from batchrun.cli.job_file import with_job_file
from batchrun.cli.render import plan_tables, status_table, validation_table
from batchrun.cli.run_command import RUN_HELP_INTRO, run
from batchrun.core.errors import InputError
from batchrun.core.job.config import BUNDLED_MODEL
from batchrun.core.job.rows import Columns
from batchrun.core.sizes import parse_memory

# torch and transformers load only inside the commands that need them (`run`, `plan`,
# `validate --model`), so `--help`, `--version` and `status` answer at once.

app = typer.Typer(
    help=f"Offline, large-batch LLM inference with global prefix sharing.\n\n{EXIT_CODES_HELP}",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
app.command(help=RUN_HELP_INTRO + EXIT_CODES_HELP)(run)


def _print_version(value: bool) -> None:
    if value:
        print(f"batchrun {version()}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _global_options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print batchrun's version and exit.", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    pass


@app.command()
def validate(
    ctx: typer.Context,
    input: Annotated[
        Path, typer.Argument(metavar="INPUT", help="Prompt file to check (or a run's TOML job file).")
    ],
    model: Annotated[
        Path | None, typer.Option(help="Also tokenize with this checkpoint and check context lengths.")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="As for run: used for the context check.")] = None,
    limit: Limit = None,
    prompt_column: PromptColumn = "prompt",
    messages_column: MessagesColumn = "messages",
    id_column: IdColumn = "id",
    output_prefix: OutputPrefix = "",
    chat_template: ChatTemplate = None,
    chat_template_kwargs: ChatTemplateKwargs = None,
) -> None:
    """Check a prompt file (format, fields, ids, token lengths) without running anything."""
    o = with_job_file(ctx, validate, {name: value for name, value in locals().items() if name != "ctx"})
    from batchrun.core.job.validate import validate_file

    quiet_libraries()
    sampling = sampling_overrides(max_tokens=o.max_tokens)
    columns = Columns(o.prompt_column, o.messages_column, o.id_column, o.output_prefix)
    try:
        report = validate_file(
            o.input,
            columns,
            o.model,
            sampling,
            read_chat_template(o.chat_template),
            parse_template_kwargs(o.chat_template_kwargs),
            limit=o.limit,
        )
    except InputError as exc:
        raise fail(EXIT_INPUT, str(exc)) from None
    out.print(validation_table(report))
    if report.problems:
        raise typer.Exit(EXIT_ROWS_FAILED)


@app.command("plan")
def plan_command(
    ctx: typer.Context,
    input: Annotated[
        Path, typer.Argument(metavar="INPUT", help="Prompt file (or a run's TOML job file), as for run.")
    ],
    model: ModelOpt = BUNDLED_MODEL,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of tables.")
    ] = False,
    top: Annotated[int, typer.Option(help="Shared segments and groups to show.")] = 10,
    save: Annotated[
        Path | None, typer.Option(help="Write the plan here; `batchrun run --plan PATH` executes it.")
    ] = None,
    block_size: Annotated[int, typer.Option(help="Tokens per KV-cache block, as for run.")] = 16,
    max_tokens: Annotated[
        int | None, typer.Option(help="As for run: output-length estimate and context check.")
    ] = None,
    kv_memory: Annotated[
        str | None,
        typer.Option(help="KV budget for the LRU comparison, as for run (default: what run would get here)."),
    ] = None,
    limit: Limit = None,
    prompt_column: PromptColumn = "prompt",
    messages_column: MessagesColumn = "messages",
    id_column: IdColumn = "id",
    output_prefix: OutputPrefix = "",
    chat_template: ChatTemplate = None,
    chat_template_kwargs: ChatTemplateKwargs = None,
    workers: Annotated[
        int | None, typer.Option(help="Show how N workers would split the job and the expected balance.")
    ] = None,
) -> None:
    """Plan a job without running it: prefix sharing, order, and what it saves against an LRU cache."""
    o = with_job_file(ctx, plan_command, {name: value for name, value in locals().items() if name != "ctx"})
    from batchrun.cli.progress import TokenizeProgress
    from batchrun.core.job.plan_command import plan_job
    from batchrun.core.job.plan_file import save_plan

    if o.block_size < 1 or o.top < 0 or (o.workers is not None and o.workers < 1):
        raise fail(EXIT_USAGE, "--block-size and --workers must be >= 1 and --top >= 0")
    try:
        budget = parse_memory(o.kv_memory) if o.kv_memory else None
    except ValueError as exc:
        raise fail(EXIT_USAGE, str(exc)) from None
    sampling = sampling_overrides(max_tokens=o.max_tokens)
    quiet_libraries()
    try:
        report, plan = plan_job(
            o.input,
            o.model,
            columns=Columns(o.prompt_column, o.messages_column, o.id_column, o.output_prefix),
            sampling=sampling,
            block_size=o.block_size,
            kv_memory=budget,
            top=o.top,
            chat_template=read_chat_template(o.chat_template),
            chat_template_kwargs=parse_template_kwargs(o.chat_template_kwargs),
            limit=o.limit,
            observer=TokenizeProgress(err),
            workers=o.workers,
        )
    except InputError as exc:
        raise fail(EXIT_INPUT, str(exc)) from None
    if o.save is not None:
        save_plan(plan, o.save, o.input, o.model.name)
    if o.json_output:
        document = report.to_json() | {"saved_to": str(o.save) if o.save else None}
        print(json.dumps(document, indent=2))
        return
    for renderable in plan_tables(report):
        out.print(renderable)
    if o.save is not None:
        out.print(f"plan saved to {o.save}; run it with: batchrun run {o.input} --plan {o.save}")


@app.command(
    help="Progress of a job from its lock, journal and report: running, interrupted, done or "
    "failed.\n\n\b\nExit codes (for monitoring):\n"
    "  0  done\n"
    "  4  failed (run the same command again to resume)\n"
    "  5  interrupted: killed or Ctrl-C (run it again to resume)\n"
    "  6  running\n"
    "  7  not started (nothing beside OUTPUT)\n"
    "  8  no report (an output or journal without its report)\n"
)
def status(
    output: Annotated[
        Path,
        typer.Argument(metavar="OUTPUT", help="The output path of a job (running, interrupted or done)."),
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    from batchrun.core.job.status import STATE_EXIT_CODES, job_status, status_json

    state = job_status(output)
    if json_output:
        print(json.dumps(status_json(state), indent=2))
    else:
        out.print(status_table(state))
    raise typer.Exit(STATE_EXIT_CODES[state.state])


def cli(args: list[str] | None = None) -> int:
    """Run the command line and return its exit code. Usage errors print one line and return
    1; bare ``batchrun`` prints the help and returns 0."""
    args = sys.argv[1:] if args is None else list(args)
    if not args:
        args = ["--help"]
    try:
        code = app(args=args, prog_name="batchrun", standalone_mode=False)
    except TyperException as exc:  # typer's vendored click: UsageError, BadParameter, ...
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see '{ctx.command_path} --help')"
        err.print(f"[bold red]error:[/] {exc.format_message()}{hint}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except typer.Abort:
        err.print("aborted", highlight=False)
        return 130
    return code if isinstance(code, int) else EXIT_OK


def main() -> None:
    """Console entry point."""
    sys.exit(cli())


if __name__ == "__main__":
    main()
