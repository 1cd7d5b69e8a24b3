"""``batchrun run``: its options, and the job they configure."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from batchrun.cli.common import (
    EXIT_ENGINE,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_ROWS_FAILED,
    EXIT_USAGE,
    Backend,
    ChatTemplate,
    ChatTemplateKwargs,
    Device,
    DType,
    IdColumn,
    Limit,
    MessagesColumn,
    ModelOpt,
    Order,
    OutputPrefix,
    PromptColumn,
    err,
    fail,
    out,
    parse_template_kwargs,
    quiet_libraries,
    read_chat_template,
    sampling_overrides,
)
from batchrun.cli.job_file import with_job_file
from batchrun.cli.progress import ConsoleObserver
from batchrun.cli.render import summary_table
from batchrun.core.distributed.config import DistributedConfig
from batchrun.core.engine.config import EngineConfig
from batchrun.core.errors import InputError
from batchrun.core.job.config import BUNDLED_MODEL, SAMPLE_JOBS, JobConfig
from batchrun.core.job.io.source import STDIO
from batchrun.core.job.lock import OutputLocked
from batchrun.core.job.rows import Columns
from batchrun.core.sizes import SIZE_HELP, parse_memory

RUN_HELP_INTRO = (
    "Generate a completion for every row and write them back into their rows.\n\n"
    "INPUT may be a TOML job file holding these options under their long names (and "
    "`input`); options on the command line override it.\n\n"
)


def run(
    ctx: typer.Context,
    input: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT",
            help="Prompt file (.jsonl[.gz|.zst], OpenAI batch .jsonl, .parquet, a folder or quoted "
            "glob of .parquet shards, a datasets folder) or a .toml job file.",
        ),
    ],
    model: ModelOpt = BUNDLED_MODEL,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Output path; its extension picks the format (.jsonl[.gz|.zst], .parquet). "
            "Default: <input stem>.out.<ext> beside the input.",
        ),
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
    min_p: Annotated[
        float | None, typer.Option(help="Drop tokens less likely than min_p x the most likely (0 = off).")
    ] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option(help="vLLM's repetition penalty over prompt and output (1 = off).")
    ] = None,
    presence_penalty: Annotated[
        float | None, typer.Option(help="Subtract this from tokens already in the output ([-2, 2]).")
    ] = None,
    frequency_penalty: Annotated[
        float | None, typer.Option(help="Subtract this x each token's count in the output ([-2, 2]).")
    ] = None,
    min_tokens: Annotated[
        int | None, typer.Option(help="Tokens to generate before EOS, stop tokens or stop strings count.")
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="Stop string (repeat for several); rows may add theirs."),
    ] = None,
    stop_token_ids: Annotated[
        list[int] | None, typer.Option("--stop-token-id", help="Token id that ends a row (repeatable).")
    ] = None,
    include_stop_str_in_output: Annotated[
        bool, typer.Option("--include-stop-str-in-output", help="Keep the matched stop string in the text.")
    ] = False,
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
    limit: Limit = None,
    prompt_column: PromptColumn = "prompt",
    messages_column: MessagesColumn = "messages",
    id_column: IdColumn = "id",
    output_prefix: OutputPrefix = "",
    chat_template: ChatTemplate = None,
    chat_template_kwargs: ChatTemplateKwargs = None,
    attention_backend: Annotated[
        Backend,
        typer.Option(
            help="Attention kernels: auto picks for the device (logged, and kept in the report); "
            "flash: FlashAttention through torch's varlen_attn (CUDA, fp16/bf16)."
        ),
    ] = Backend.auto,
    block_size: Annotated[int, typer.Option(help="Tokens per KV-cache block.")] = 16,
    token_budget: Annotated[
        int | None,
        typer.Option(help="Max tokens packed into one engine step [default: 2048 on CPU, 4096 on CUDA]."),
    ] = None,
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
    cuda_graphs: Annotated[
        bool,
        typer.Option(
            help="On CUDA with the triton backend, replay steps of up to 512 tokens from CUDA graphs "
            "(captured as they come). --no-cuda-graphs: every step eager."
        ),
    ] = True,
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
    workers: Annotated[
        int | None,
        typer.Option(
            help="Scale out over N Ray workers, one engine per device (CPU workers without GPUs) "
            "[default: one per GPU when this machine has several, else 1: no Ray].",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Run the workers on this Ray cluster (e.g. auto, head:6379, ray://head:10001)."),
    ] = None,
) -> None:
    # Must stay the first statement: it collects exactly the parameters.
    options = {name: value for name, value in locals().items() if name != "ctx"}
    _run(with_job_file(ctx, run, options))


def _run(o: SimpleNamespace) -> None:
    """``run`` with its options (command line over job file) as attributes of ``o``."""
    from batchrun.core.api import run_config  # torch and transformers load here

    if not 0.0 <= o.max_error_rate <= 1.0:
        raise fail(EXIT_USAGE, f"--max-error-rate must be in [0, 1], got {o.max_error_rate}")
    try:
        engine = EngineConfig(
            block_size=o.block_size,
            token_budget=o.token_budget,
            kv_cache_bytes=parse_memory(o.kv_memory) if o.kv_memory else None,
            reserve_full=o.reserve_full,
            attention_backend=o.attention_backend.value,
            cuda_graphs=o.cuda_graphs,
        )
    except ValueError as exc:
        raise fail(EXIT_USAGE, str(exc)) from None
    sampling = sampling_overrides(
        max_tokens=o.max_tokens,
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        min_p=o.min_p,
        repetition_penalty=o.repetition_penalty,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
        min_tokens=o.min_tokens,
        stop=o.stop or None,
        stop_token_ids=o.stop_token_ids or None,
        include_stop_str_in_output=o.include_stop_str_in_output or None,
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
        chat_template=read_chat_template(o.chat_template),
        chat_template_kwargs=parse_template_kwargs(o.chat_template_kwargs),
        limit=o.limit,
        distributed=scale_out(o.workers, o.ray_address),
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
        summary = run_config(config, observer)
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


def scale_out(workers: int | None, address: str | None) -> DistributedConfig | None:
    """The job's Ray workers, or None to run in this process: ``--workers 1`` without an
    address, and a machine with at most one GPU and no ``--workers``, need no Ray."""
    if workers is None and address is None:
        import torch

        gpus = torch.cuda.device_count()
        if gpus < 2:
            return None
        if importlib.util.find_spec("ray") is None:
            err.print(f"batchrun: {gpus} GPUs seen; pip install 'batchrun[ray]' to use them all (--workers)")
            return None
        workers = gpus
    elif workers == 1 and address is None:
        return None
    if importlib.util.find_spec("ray") is None:
        raise fail(EXIT_USAGE, "--workers / --ray-address need Ray: pip install 'batchrun[ray]'")
    try:
        return DistributedConfig(workers=workers, address=address)
    except ValueError as exc:
        raise fail(EXIT_USAGE, str(exc)) from None


def resume_hint(observer: ConsoleObserver) -> str:
    journaled, journal = observer.stopped_at or (0, None)
    if journal is None:
        return "no finished row was kept; run the same command again to start over"
    return (
        f"{journaled} finished row(s) are kept in {journal}; run the same command again to "
        "resume (they are not generated again)"
    )
