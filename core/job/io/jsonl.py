"""JSONL prompt files: plain rows, and the OpenAI Batch API request format."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from batchrun.core.errors import InputError
from batchrun.core.job.io.atomic import atomic_file
from batchrun.core.job.io.source import STDIO, OutputContext, PromptSource
from batchrun.core.job.rows import GENERATED_COLUMNS, ROW_PROBLEM, Columns, RowResult, earlier_run_columns


def iter_json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; a malformed line is fatal."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(
                    f"{path}:{line_no}: not valid JSON ({exc}); fix or remove this line"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(
                    f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}"
                )
            yield line_no, obj


def _write_lines(path: Path, lines: Iterator[dict[str, Any]]) -> None:
    if path == STDIO:
        for obj in lines:
            sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for obj in lines:
            out.write(json.dumps(obj, ensure_ascii=False))
            out.write("\n")


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

    def write(self, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
        prefix = self.columns.output_prefix
        generated = {prefix + name for name in GENERATED_COLUMNS}

        def merged() -> Iterator[dict[str, Any]]:
            for (_, obj), result in zip(iter_json_objects(self.path), results, strict=True):
                kept = {k: v for k, v in obj.items() if k not in generated}
                yield kept | result.columns(context.shape, prefix)

        _write_lines(output, merged())


# OpenAI Batch API: https://platform.openai.com/docs/guides/batch (request and output lines).
OPENAI_COLUMNS = Columns(prompt="body.prompt", messages="body.messages", id="custom_id")
OPENAI_URLS = {"/v1/chat/completions": "chat.completion", "/v1/completions": "text_completion"}


def is_openai_batch(obj: dict[str, Any] | None) -> bool:
    return obj is not None and "custom_id" in obj and isinstance(obj.get("body"), dict)


class OpenAIBatchSource(PromptSource):
    """OpenAI Batch API input (``custom_id``, ``method``, ``url``, ``body``); the output is
    the Batch API's output format, one line per request, in input order."""

    format_name = "openai-batch"

    def __init__(self, path: Path, columns: Columns = OPENAI_COLUMNS) -> None:
        super().__init__(path, OPENAI_COLUMNS)

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for line_no, obj in iter_json_objects(self.path):
            yield f"line {line_no}", self._fields(obj)

    @staticmethod
    def _fields(obj: dict[str, Any]) -> dict[str, Any]:
        body = obj.get("body") if isinstance(obj.get("body"), dict) else {}
        fields = {
            "custom_id": obj.get("custom_id"),
            "body.prompt": body.get("prompt"),
            "body.messages": body.get("messages"),
            "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
        }
        fields |= {k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed", "stop")}
        url = obj.get("url", "/v1/chat/completions")
        if url not in OPENAI_URLS:
            fields[ROW_PROBLEM] = f"unsupported url {url!r}; use one of {sorted(OPENAI_URLS)}"
        elif body.get("n", 1) != 1:
            fields[ROW_PROBLEM] = "body.n > 1 is not supported yet; send one request per sample"
        return fields

    def write(self, output: Path, results: Sequence[RowResult], context: OutputContext) -> None:
        def lines() -> Iterator[dict[str, Any]]:
            pairs = zip(iter_json_objects(self.path), results, strict=True)
            for index, ((_, obj), result) in enumerate(pairs):
                yield openai_output_line(index, obj, result, context)

        _write_lines(output, lines())


def openai_output_line(
    index: int, request: dict[str, Any], result: RowResult, context: OutputContext
) -> dict[str, Any]:
    line: dict[str, Any] = {"id": f"batch_req_{index}", "custom_id": request.get("custom_id")}
    if result.finish_reason == "error":
        line["response"] = None
        line["error"] = {"code": "batchrun_error", "message": result.error}
        return line
    obj_type = OPENAI_URLS.get(request.get("url", "/v1/chat/completions"), "chat.completion")
    if obj_type == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.output}}
    else:
        choice = {"index": 0, "text": result.output}
    choice |= {"finish_reason": result.finish_reason, "logprobs": None}
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.output_tokens,
        "total_tokens": result.prompt_tokens + result.output_tokens,
    }
    body = {
        "id": f"{'chatcmpl' if obj_type == 'chat.completion' else 'cmpl'}-{index}",
        "object": obj_type,
        "created": context.created,
        "model": context.model_name,
        "choices": [choice],
        "usage": usage,
    }
    line["response"] = {"status_code": 200, "request_id": f"req_{index}", "body": body}
    line["error"] = None
    return line
