"""The ``batchrun`` command line. It builds typed configs and renders; the core does the work.

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
import os
import sys
import typing
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.exceptions import TyperException

from batchrun.cli.job_file import is_job_file, read_job_file
from batchrun.cli.progress import ConsoleObserver
from batchrun.cli.render import plan_tables, status_table, summary_table, validation_table
from batchrun.core.engine.config import EngineConfig
from batchrun.core.errors import InputError
from batchrun.core.job.config import BUNDLED_MODEL, SAMPLE_JOBS, JobConfig
from batchrun.core.job.io.source import STDIO
from batchrun.core.job.lock import OutputLocked
from batchrun.core.job.rows import Columns
from batchrun.core.params import ParamError, SamplingParams
from batchrun.core.planner.plan import ORDER_INPUT, ORDER_PLAN
from batchrun.core.sizes import SIZE_HELP, parse_memory

# torch and transformers load only inside the commands that need them (`run`, `plan`,
# `validate --model`), so `--help`, `--version` and `status` answer at once.

# "\b" keeps click from re-flowing the exit-code table into one paragraph.
EXIT_CODES_HELP = "\b\n" + __doc__.split("\n", 2)[2]
EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_ROWS_FAILED, EXIT_ENGINE, EXIT_LOCKED = 0, 1, 2, 3, 4, 75
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT, as shells report it

app = typer.Typer(
    help=f"Offline, large-batch LLM inference with global prefix sharing.\n\n{EXIT_CODES_HELP}",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Order(str, Enum):
    plan = ORDER_PLAN
    input = ORDER_INPUT


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


def quiet_libraries() -> None:
    """batchrun reports progress itself: silence transformers' and datasets' own bars and
    info logs. Imports transformers, so only commands that need the model call it."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


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


@app.command(
    help="Generate a completion for every row and write them back into their rows.\n\n"
    "INPUT may be a TOML job file holding these options under their long names (and "
    "`input`); options on the command line override it.\n\n" + EXIT_CODES_HELP
)
def run(
    ctx: typer.Context,
    input: Annotated[
        Path,
        typer.Argument(
            help="Prompt file (.jsonl, OpenAI batch .jsonl, .parquet, a datasets folder) or a .toml job file."
        ),
    ],
    model: ModelOpt = BUNDLED_MODEL,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Output path. Default: <input stem>.out.<ext> beside the input."),
    ] = None,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Replace the input file itself (atomically).")
    ] = False,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens per row [default: 256].")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="0 = greedy [default: greedy, or the model's generation_config].")
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass in (0, 1].")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens (0 = off).")] = None,
    seed: Annotated[
        int, typer.Option(help="Job seed; rows without a seed derive theirs from it and their id.")
    ] = 0,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Keep generating past EOS up to max_tokens.")
    ] = False,
    n: Annotated[
        int | None,
        typer.Option("--n", help="Samples per row; they share the prompt's KV. Output becomes a list."),
    ] = None,
    logprobs: Annotated[
        int | None,
        typer.Option(help="Add a logprobs column: each token's logprob and the K most likely tokens."),
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to run.")] = Device.auto,
    dtype: Annotated[
        DType, typer.Option(help="Weights and KV dtype (auto: float32 on CPU, bfloat16 on GPU).")
    ] = DType.auto,
    prompt_column: PromptColumn = "prompt",
    messages_column: MessagesColumn = "messages",
    id_column: IdColumn = "id",
    output_prefix: OutputPrefix = "",
    block_size: Annotated[int, typer.Option(help="Tokens per KV-cache block.")] = 16,
    token_budget: Annotated[int, typer.Option(help="Max tokens packed into one engine step.")] = 2048,
    kv_memory: Annotated[
        str | None,
        typer.Option(help=f"KV cache size: {SIZE_HELP}."),
    ] = None,
    reserve_full: Annotated[
        bool,
        typer.Option(
            "--reserve-full",
            help="Reserve each row's whole max_tokens of KV at admission: never preempt, admit fewer.",
        ),
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Refuse the whole file if any row is invalid (default: such rows get an error record).",
        ),
    ] = False,
    log_every: Annotated[
        float, typer.Option(help="Seconds between progress lines when not on a terminal.")
    ] = 30.0,
    plan: Annotated[
        Path | None,
        typer.Option(help="Execute a plan saved by `batchrun plan --save` (checked against the input)."),
    ] = None,
    prefix_sharing: Annotated[
        bool,
        typer.Option(help="Compute shared prompt prefixes once. --no-prefix-sharing: for comparison."),
    ] = True,
    order: Annotated[
        Order, typer.Option(help="plan: shared prefixes together, decode-heavy first; input: file order.")
    ] = Order.plan,
    restart: Annotated[
        bool,
        typer.Option("--restart", help="Discard the journal of an unfinished earlier run and start over."),
    ] = False,
    max_error_rate: Annotated[
        float, typer.Option(help="Share of failed rows (0-1) still counted a success (exit 0).")
    ] = 0.0,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Progress as JSON lines on stderr instead of text.")
    ] = False,
) -> None:
    # Must stay the first statement: it collects exactly the parameters.
    options = {name: value for name, value in locals().items() if name != "ctx"}
    _run(with_job_file(ctx, run, options))


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


SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "n", "logprobs")


def _run(o: SimpleNamespace) -> None:
    """``run`` with its options (command line over job file) as attributes of ``o``."""
    from batchrun.core.job.run import run_job  # torch and transformers load here

    if not 0.0 <= o.max_error_rate <= 1.0:
        raise fail(EXIT_USAGE, f"--max-error-rate must be in [0, 1], got {o.max_error_rate}")
    try:
        engine = EngineConfig(
            block_size=o.block_size,
            token_budget=o.token_budget,
            kv_cache_bytes=parse_memory(o.kv_memory) if o.kv_memory else None,
            reserve_full=o.reserve_full,
        )
    except ValueError as exc:
        raise fail(EXIT_USAGE, str(exc)) from None
    sampling = sampling_overrides(
        max_tokens=o.max_tokens,
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        ignore_eos=o.ignore_eos or None,
        n=o.n,
        logprobs=o.logprobs,
    )
    config = JobConfig(
        input=o.input,
        model=o.model,
        output=o.output,
        in_place=o.in_place,
        columns=Columns(o.prompt_column, o.messages_column, o.id_column, o.output_prefix),
        sampling=sampling,
        seed=o.seed,
        device=o.device.value,
        dtype=o.dtype.value,
        engine=engine,
        strict=o.strict,
        plan_file=o.plan,
        prefix_sharing=o.prefix_sharing,
        order=o.order.value,
        restart=o.restart,
    )
    quiet_libraries()
    if o.model.resolve() == BUNDLED_MODEL and not o.input.resolve().is_relative_to(SAMPLE_JOBS):
        err.print(
            f"[bold yellow]warning:[/] using the bundled demo model {BUNDLED_MODEL}: it has RANDOM "
            "weights and writes gibberish. Pass --model /path/to/checkpoint for real output.",
            highlight=False,
            soft_wrap=True,
        )
    observer = ConsoleObserver(err, log_every=o.log_every, json_lines=o.log_json)
    try:
        summary = run_job(config, observer)
    except OutputLocked as exc:
        observer.close()
        raise fail(EXIT_LOCKED, str(exc)) from None
    except InputError as exc:
        observer.close()
        raise fail(EXIT_INPUT, str(exc)) from None
    except KeyboardInterrupt:
        observer.close()
        raise fail(EXIT_INTERRUPTED, f"interrupted; {resume_hint(observer)}") from None
    except Exception as exc:
        observer.close()
        if err.is_terminal:
            err.print_exception()
        message = f"engine failure: {type(exc).__name__}: {exc}; {resume_hint(observer)}"
        raise fail(EXIT_ENGINE, message) from None
    observer.close()
    # With -o - stdout carries the rows; the summary goes to stderr with the progress.
    (err if summary.output == STDIO else out).print(summary_table(summary))
    if summary.failed and summary.failed > o.max_error_rate * summary.rows:
        raise typer.Exit(EXIT_ROWS_FAILED)


def resume_hint(observer: ConsoleObserver) -> str:
    journaled, journal = observer.stopped_at or (0, None)
    if journal is None:
        return "no finished row was kept; run the same command again to start over"
    return (
        f"{journaled} finished row(s) are kept in {journal}; run the same command again to "
        "resume (they are not generated again)"
    )


@app.command()
def validate(
    ctx: typer.Context,
    input: Annotated[Path, typer.Argument(help="Prompt file to check (or a run's TOML job file).")],
    model: Annotated[
        Path | None, typer.Option(help="Also tokenize with this checkpoint and check context lengths.")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="As for run: used for the context check.")] = None,
    prompt_column: PromptColumn = "prompt",
    messages_column: MessagesColumn = "messages",
    id_column: IdColumn = "id",
    output_prefix: OutputPrefix = "",
) -> None:
    """Check a prompt file (format, fields, ids, token lengths) without running anything."""
    o = with_job_file(ctx, validate, {name: value for name, value in locals().items() if name != "ctx"})
    from batchrun.core.job.validate import validate_file

    quiet_libraries()
    sampling = sampling_overrides(max_tokens=o.max_tokens)
    columns = Columns(o.prompt_column, o.messages_column, o.id_column, o.output_prefix)
    try:
        report = validate_file(o.input, columns, o.model, sampling)
    except InputError as exc:
        raise fail(EXIT_INPUT, str(exc)) from None
    out.print(validation_table(report))
    if report.problems:
        raise typer.Exit(EXIT_ROWS_FAILED)


@app.command("plan")
def plan_command(
    ctx: typer.Context,
    input: Annotated[Path, typer.Argument(help="Prompt file (or a run's TOML job file), as for run.")],
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
    prompt_column: PromptColumn = "prompt",
    messages_column: MessagesColumn = "messages",
    id_column: IdColumn = "id",
    output_prefix: OutputPrefix = "",
) -> None:
    """Plan a job without running it: prefix sharing, order, and what it saves against an LRU cache."""
    o = with_job_file(ctx, plan_command, {name: value for name, value in locals().items() if name != "ctx"})
    from batchrun.core.job.plan_command import plan_job
    from batchrun.core.job.plan_file import save_plan

    if o.block_size < 1 or o.top < 0:
        raise fail(EXIT_USAGE, "--block-size must be >= 1 and --top >= 0")
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
    output: Annotated[Path, typer.Argument(help="The output path of a job (running, interrupted or done).")],
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
