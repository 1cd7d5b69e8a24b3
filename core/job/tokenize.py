"""Rows to token ids: chat template where the row is a chat, then batched fast tokenization."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from batchrun.core.job.rows import Row
from batchrun.core.planner.prompt_tokens import PromptTokens, PromptTokensBuilder

TOKENIZE_BATCH = 1024


def render(
    row: Row, tokenizer: PreTrainedTokenizerBase, template_kwargs: dict[str, Any] | None = None
) -> str:
    """The prompt text of a row: raw text, or its messages through the chat template (with
    ``template_kwargs``, e.g. ``enable_thinking``)."""
    if row.messages is None:
        return row.prompt or ""
    if not tokenizer.chat_template:
        raise ValueError("the model's tokenizer has no chat template; send 'prompt' rows instead")
    return tokenizer.apply_chat_template(
        row.messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )


def tokenize_rows(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase, template_kwargs: dict[str, Any] | None = None
) -> PromptTokens:
    """Token ids of every row (length 0 where the row has or gets an error).

    Raw prompts get the tokenizer's special tokens (e.g. BOS); rendered chats already
    contain them. A row the tokenizer fails on gets ``row.error``; the others go on.
    Each batch goes straight into a numpy chunk, so memory stays ~4 bytes per token.
    """
    ids = PromptTokensBuilder(len(rows))
    pending: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
    for i, row in enumerate(rows):
        if row.error:
            continue
        try:
            pending[row.messages is None].append((i, render(row, tokenizer, template_kwargs)))
        except Exception as exc:  # template errors are the row's, whatever their type
            row.error = f"{row.location}: the chat template failed on this row ({exc})"
    for add_special, items in pending.items():
        for start in range(0, len(items), TOKENIZE_BATCH):
            _encode(items[start : start + TOKENIZE_BATCH], add_special, rows, ids, tokenizer)
    return ids.build()


def _encode(items, add_special, rows, ids: PromptTokensBuilder, tokenizer) -> None:
    try:
        encoded = tokenizer([text for _, text in items], add_special_tokens=add_special)["input_ids"]
    except Exception:  # isolate the bad row(s): retry one by one
        for item in items:
            if len(items) > 1:
                _encode([item], add_special, rows, ids, tokenizer)
            else:
                i = item[0]
                rows[i].error = f"{rows[i].location}: the tokenizer failed on this row"
        return
    for (i, _), token_ids in zip(items, encoded, strict=True):
        if not token_ids:
            rows[i].error = f"{rows[i].location}: the prompt tokenizes to no tokens"
    ids.set_many((i for i, _ in items), encoded)
