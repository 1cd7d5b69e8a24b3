"""JSONL prompt files: plain rows, and the OpenAI Batch API request format."""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from batchrun.core.errors import InputError
from batchrun.core.job.io.atomic import atomic_file
from batchrun.core.job.io.compression import compression_of, open_binary, open_text_writer
from batchrun.core.job.io.source import STDIO, OutputContext, PromptSource
from batchrun.core.job.rows import (
    GENERATED_COLUMNS,
    ROW_PROBLEM,
    UP_TO_CONTEXT,
    Columns,
    RowResult,
    earlier_run_columns,
)
from batchrun.core.params import ROW_PARAM_KEYS


def iter_json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line (``.gz`` / ``.zst`` decompressed
    as they stream); a malformed line or a damaged archive is fatal."""
    try:
        with open_binary(path) as f:
            yield from _objects(path, f)
    except (OSError, EOFError, pa.ArrowException) as exc:  # a damaged .gz / .zst
        raise InputError(f"{path}: could not be decompressed ({exc})") from None


def _objects(path: Path, f) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}:{line_no}: not valid JSON ({exc}); fix or remove this line") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}")
        yield line_no, obj


def write_lines(path: Path, lines: Iterator[dict[str, Any]]) -> None:
    if path == STDIO:
        for obj in lines:
            sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    with atomic_file(path) as tmp, open_text_writer(tmp, compression_of(path)) as out:
        for obj in lines:
            out.write(json.dumps(obj, ensure_ascii=False, default=json_default))
            out.write("\n")


def json_default(value: Any) -> Any:
    """JSON for the values Parquet and ``datasets`` columns hold that JSON lacks: dates and
    times as ISO 8601 text, decimals as text, binary as base64 text."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"a {type(value).__name__} value cannot be written as JSON")


def first_object(path: Path) -> dict[str, Any] | None:
    for _, obj in iter_json_objects(path):
        return obj
    return None


class JsonlSource(PromptSource):
    """One JSON object per line with ``prompt`` or ``messages``, an optional ``id`` and
    per-row sampling keys. The output keeps every input key and adds the generated ones."""

    format_name = "jsonl"

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        generated = {self.columns.generated(name) for name in GENERATED_COLUMNS}
        for line_no, obj in iter_json_objects(self.path):
            names = {k: isinstance(v, int) or v is None for k, v in obj.items()}
            if earlier_run_columns(f"{self.path}:{line_no}", names, self.columns):
                obj = {k: v for k, v in obj.items() if k not in generated}  # replaced, not read
            yield f"line {line_no}", obj

    def input_objects(self) -> Iterator[dict[str, Any]]:
        """Every input row (up to ``limit``) as written back: generated columns of an earlier
        run left out."""
        generated = {self.columns.generated(name) for name in GENERATED_COLUMNS}
        for _, obj in self.limited(iter_json_objects(self.path)):
            yield {k: v for k, v in obj.items() if k not in generated}

    def write(self, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
        prefix = self.columns.output_prefix

        def merged() -> Iterator[dict[str, Any]]:
            for obj, result in zip(self.input_objects(), results, strict=True):
                yield obj | result.columns(context.shape, prefix)

        write_lines(output, merged())


# OpenAI Batch API: https://platform.openai.com/docs/guides/batch (request and output lines).
OPENAI_COLUMNS = Columns(prompt="body.prompt", messages="body.messages", id="custom_id")
OPENAI_URLS = {"/v1/chat/completions": "chat.completion", "/v1/completions": "text_completion"}
# Body keys read as the row's sampling parameters (OpenAI's, and vLLM's extra ones); the
# token limit and logprobs have OpenAI spellings of their own, mapped in ``_fields``.
OPENAI_SAMPLING_KEYS = tuple(k for k in ROW_PARAM_KEYS if k not in ("max_tokens", "logprobs"))


def is_openai_batch(obj: dict[str, Any] | None) -> bool:
    return obj is not None and "custom_id" in obj and isinstance(obj.get("body"), dict)


class OpenAIBatchSource(PromptSource):
    """OpenAI Batch API input (``custom_id``, ``method``, ``url``, ``body``); the output is
    the Batch API's output format, one line per request, in input order.

    Defaults as vLLM's ``run-batch`` applies them: a body without ``temperature`` samples at
    1.0 (unless the job or the model's generation config sets one), and one without
    ``max_tokens`` generates up to the context (capped by a job-wide ``max_tokens``)."""

    format_name = "openai-batch"
    base_defaults: ClassVar[dict[str, Any]] = {"temperature": 1.0}

    def __init__(self, path: Path, columns: Columns = OPENAI_COLUMNS) -> None:
        super().__init__(path, OPENAI_COLUMNS)

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for line_no, obj in iter_json_objects(self.path):
            yield f"line {line_no}", self._fields(obj)

    @staticmethod
    def _fields(obj: dict[str, Any]) -> dict[str, Any]:
        body = obj.get("body") if isinstance(obj.get("body"), dict) else {}
        url = obj.get("url", "/v1/chat/completions")
        fields = {
            "custom_id": obj.get("custom_id"),
            "body.prompt": body.get("prompt"),
            "body.messages": body.get("messages"),
            "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
        }
        fields[UP_TO_CONTEXT] = fields["max_tokens"] is None  # OpenAI and vLLM: up to the context
        fields |= {k: body.get(k) for k in OPENAI_SAMPLING_KEYS}
        # Chat: logprobs is a flag and top_logprobs the count; completions: logprobs is the count.
        logprobs = body.get("logprobs")
        if url == "/v1/chat/completions" and logprobs is not None:
            fields["logprobs"] = (body.get("top_logprobs") or 0) if logprobs is True else None
            if logprobs not in (True, False):
                fields[ROW_PROBLEM] = f"body.logprobs must be true or false, got {logprobs!r}"
        else:
            fields["logprobs"] = logprobs
        problem = _unsupported(url, body)
        if problem is None and isinstance(fields["body.messages"], list):
            fields["body.messages"], problem = _text_messages(fields["body.messages"])
        if problem is not None:
            fields[ROW_PROBLEM] = problem
        return fields

    def write(self, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
        def lines() -> Iterator[dict[str, Any]]:
            pairs = zip(self.limited(iter_json_objects(self.path)), results, strict=True)
            for index, ((_, obj), result) in enumerate(pairs):
                yield openai_output_line(index, obj, result, context)

        write_lines(output, lines())


# Body keys batchrun does not apply yet, with the value that means "off": a request that sets
# one to anything else gets an error line rather than having it silently ignored.
UNSUPPORTED_BODY_KEYS = {
    "logit_bias": None,
    "response_format": None,
    "tools": None,
    "best_of": None,
    "echo": False,
    "suffix": None,
    "stream": False,
}


def _unsupported(url: str, body: dict[str, Any]) -> str | None:
    if url not in OPENAI_URLS:
        return f"unsupported url {url!r}; use one of {sorted(OPENAI_URLS)}"
    for key, off in UNSUPPORTED_BODY_KEYS.items():
        value = body.get(key)
        if value is not None and value != off and value != [] and value != {"type": "text"}:
            return f"body.{key} = {json.dumps(value)} is not supported by batchrun yet; remove it"
    return None


def _text_messages(messages: list[Any]) -> tuple[list[Any], str | None]:
    """Messages with list-of-parts ``content`` joined into text (as vLLM renders text parts:
    joined by newlines); a non-text part is an error."""
    joined = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    return (
                        messages,
                        f"body.messages[{i}].content has a {kind!r} part; only text parts are supported",
                    )
                texts.append(part["text"])
            message = message | {"content": "\n".join(texts)}
        joined.append(message)
    return joined, None


def openai_output_line(
    index: int, request: dict[str, Any], result: RowResult, context: OutputContext
) -> dict[str, Any]:
    """One output line as vLLM's ``run-batch`` writes it: ``id``, ``custom_id``, ``response``
    (``status_code``, ``request_id``, ``body``: ``null`` on error) and ``error`` (the message)."""
    line: dict[str, Any] = {"id": f"batchrun-{uuid.uuid4().hex}", "custom_id": request.get("custom_id")}
    request_id = f"batchrun-batch-{uuid.uuid4().hex}"
    if result.finish_reason == "error":
        line["response"] = {"status_code": 400, "request_id": request_id, "body": None}
        line["error"] = result.error
        return line
    obj_type = OPENAI_URLS.get(request.get("url", "/v1/chat/completions"), "chat.completion")
    texts = result.output if isinstance(result.output, list) else [result.output]
    logprobs = result.logprobs if isinstance(result.output, list) else [result.logprobs]
    choices = []
    for k, text in enumerate(texts):
        if obj_type == "chat.completion":
            choice = {"index": k, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": k, "text": text}
        choice["logprobs"] = _openai_logprobs(logprobs[k] if logprobs else None, obj_type)
        choice["finish_reason"] = result.finish_reason
        choices.append(choice)
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "total_tokens": result.prompt_tokens + result.output_tokens,
        "completion_tokens": result.output_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens},
    }
    body = {
        "id": f"{'chatcmpl' if obj_type == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
        "object": obj_type,
        "created": context.created,
        "model": context.model_name,
        "choices": choices,
        "usage": usage,
    }
    line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    line["error"] = None
    return line


def _openai_logprobs(steps: list[dict[str, Any]] | None, obj_type: str) -> dict[str, Any] | None:
    """Per-token logprobs in the chat format: each token's text and its UTF-8 bytes (an entry
    journaled without text, by an older batchrun, spells the token ``token_id:<id>``, vLLM's
    ``--return-tokens-as-token-ids`` form)."""
    if steps is None:
        return None

    def entry(step: dict[str, Any]) -> dict[str, Any]:
        text = step.get("text")
        if text is None:
            return {"token": f"token_id:{step['token']}", "logprob": step["logprob"], "bytes": None}
        return {"token": text, "logprob": step["logprob"], "bytes": list(text.encode())}

    content = [entry(step) | {"top_logprobs": [entry(t) for t in step.get("top", [])]} for step in steps]
    return {"content": content}
