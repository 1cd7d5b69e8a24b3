"""A job's unit of work (``Row``) and what comes back for it (``RowResult``).

Input parsing turns each record of the prompt file into a ``Row``: its position, its id,
where it came from (``line 7`` / ``row 7``, for error messages), what to prompt with and
how to sample. A row that cannot run carries ``error`` instead and still produces exactly
one output record, so the output always has one row per input row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from batchrun.core.errors import InputError
from batchrun.core.params import ROW_PARAM_KEYS, ParamError, SamplingParams, check_int

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class Columns:
    """Names of the input fields batchrun reads (``--prompt-column`` and friends)."""

    prompt: str = "prompt"
    messages: str = "messages"
    id: str = "id"
    output_prefix: str = ""  # put before every generated column's name (--output-prefix)

    def generated(self, name: str) -> str:
        """The output name of generated column ``name`` (``output`` -> ``gen_output``)."""
        return self.output_prefix + name


@dataclass(slots=True)  # no __dict__: a million rows are held for the whole job
class Row:
    index: int  # 0-based position in the input; outputs are written back in this order
    id: str
    location: str  # human-readable origin, e.g. "line 7" or "row 7"
    prompt: str | None = None  # raw text prompt, or ...
    messages: list[dict[str, Any]] | None = None  # ... a chat, rendered with the chat template
    params: SamplingParams | None = None
    expected_tokens: int | None = None  # optional hint of the output length, for the plan's order
    up_to_context: bool = False  # no max_tokens of its own: generate up to the context (OpenAI)
    error: str | None = None  # set when the row cannot run


@dataclass(frozen=True)
class OutputShape:
    """Which generated columns a job writes, and their types (the same for every row, so
    Parquet gets one schema)."""

    samples: bool = False  # some row asked for n > 1: ``output`` is a list of strings
    logprobs: bool = False  # some row asked for logprobs: add a ``logprobs`` column


@dataclass
class RowResult:
    """The generated columns of one output row."""

    output: str | list[str] | None  # a list when the row was sampled n > 1 times
    prompt_tokens: int
    output_tokens: int  # over all samples
    finish_reason: FinishReason  # with n > 1: "length" if any sample was cut short
    error: str | None = None
    cached_prompt_tokens: int = 0  # prompt tokens read from shared KV blocks, not computed
    token_ids: list = field(default_factory=list)  # per sample with n > 1
    logprobs: list | None = None  # per token (per sample with n > 1), when asked for

    @classmethod
    def failed(cls, message: str, prompt_tokens: int = 0) -> RowResult:
        return cls(None, prompt_tokens, 0, "error", message)

    def columns(self, shape: OutputShape = OutputShape(), prefix: str = "") -> dict[str, Any]:
        """The columns added to the input row, in output order (names after ``prefix``)."""
        output = self.output
        if shape.samples and isinstance(output, str):
            output = [output]
        columns = {
            "output": output,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "output_tokens": self.output_tokens,
            "finish_reason": self.finish_reason,
            "error": self.error,
        }
        if shape.logprobs:
            logprobs = self.logprobs
            if shape.samples and logprobs is not None and not isinstance(self.output, list):
                logprobs = [logprobs]
            columns["logprobs"] = logprobs
        return {prefix + name: value for name, value in columns.items()} if prefix else columns


# A format may flag a row it cannot express in batchrun terms under this key.
ROW_PROBLEM = "__batchrun_row_problem__"
# A format flags a row that may generate up to the context (an OpenAI body without max_tokens).
UP_TO_CONTEXT = "__batchrun_up_to_context__"

# Optional per-row hint: how many tokens the row is expected to generate (orders the plan).
EXPECTED_TOKENS = "expected_tokens"

# Every column batchrun may add; a re-run replaces them all.
GENERATED_COLUMNS = (
    "output",
    "prompt_tokens",
    "cached_prompt_tokens",
    "output_tokens",
    "finish_reason",
    "error",
    "logprobs",
)
# A row written by a batchrun run has all of these; their presence together marks a re-run.
ALWAYS_GENERATED = GENERATED_COLUMNS[:6]


def earlier_run_columns(where: str, names: dict[str, bool], columns: Columns) -> bool:
    """Whether the input row or schema ``names`` is a batchrun output (its generated columns
    are then replaced); refuse any other input column a generated one would overwrite.

    ``names`` maps each input column name to whether its values could be a per-row
    ``logprobs`` request (an integer or null), which is an input field, not a clash."""
    generated = {columns.generated(name): name for name in GENERATED_COLUMNS}
    present = [name for name in names if name in generated]
    if not present:
        return False
    if all(columns.generated(name) in names for name in ALWAYS_GENERATED):
        return True
    clashing = [n for n in present if not (generated[n] == "logprobs" and names[n])]
    if not clashing:
        return False
    listed = ", ".join(repr(n) for n in clashing)
    raise InputError(
        f"{where}: input column(s) {listed} would be overwritten by the columns batchrun adds; "
        "keep them by naming batchrun's columns with a prefix, e.g. --output-prefix gen_ "
        f"(then batchrun writes gen_{generated[clashing[0]]}, ...)"
    )


def parse_row(
    index: int, location: str, fields: dict[str, Any], columns: Columns, defaults: SamplingParams
) -> Row:
    """Validate one input record (already mapped to batchrun's field names by its format).

    Problems with a single row never raise: they are returned as ``Row.error`` with the
    field named, so the job goes on and the row gets an error record.
    """
    raw_id = fields.get(columns.id)
    row_id = str(index) if raw_id is None else raw_id
    row = Row(index=index, id=row_id, location=location)
    if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        row.id = str(index)
        row.error = f"{location}: field '{columns.id}' must be a string or integer, got {raw_id!r}"
        return row
    row.id = str(row_id)
    row.up_to_context = bool(fields.get(UP_TO_CONTEXT))
    if fields.get(ROW_PROBLEM):
        row.error = f"{location}: {fields[ROW_PROBLEM]}"
        return row
    try:
        row.prompt, row.messages = _prompt_of(fields, columns)
        row.params = defaults.with_overrides({k: fields.get(k) for k in ROW_PARAM_KEYS})
        row.expected_tokens = fields.get(EXPECTED_TOKENS)
        if isinstance(row.expected_tokens, float) and row.expected_tokens.is_integer():
            row.expected_tokens = int(row.expected_tokens)  # a pandas-written optional int column
        if row.expected_tokens is not None:
            check_int(EXPECTED_TOKENS, row.expected_tokens, minimum=0)
    except (ParamError, TypeError) as exc:
        row.error = f"{location}: {exc}"
    return row


def _prompt_of(fields: dict[str, Any], columns: Columns) -> tuple[str | None, list | None]:
    prompt, messages = fields.get(columns.prompt), fields.get(columns.messages)
    if prompt is not None and messages is not None:
        raise ParamError(f"has both '{columns.prompt}' and '{columns.messages}'; keep one")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise ParamError(f"field '{columns.messages}' must be a non-empty list of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ParamError(f"{columns.messages}[{i}] must be an object with a string 'role'")
            if not isinstance(message.get("content"), str):
                raise ParamError(f"{columns.messages}[{i}].content must be a string")
        return None, messages
    if prompt is None:
        raise ParamError(
            f"has neither '{columns.prompt}' nor '{columns.messages}' "
            "(use --prompt-column / --messages-column if your file names them differently)"
        )
    if not isinstance(prompt, str) or not prompt:
        raise ParamError(f"field '{columns.prompt}' must be a non-empty string, got {prompt!r}")
    return prompt, None
