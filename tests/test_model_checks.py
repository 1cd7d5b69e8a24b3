"""Model-level problems are found before any work (exit 2, nothing written): a folder without
weights, chat rows for a tokenizer without a chat template; and the chat-template options."""

from __future__ import annotations

import json
import shutil

import pytest

from batchrun.core.errors import InputError
from batchrun.core.job.config import JobConfig
from batchrun.core.job.plan_command import plan_job
from batchrun.core.job.run import run_job

from helpers import TINY_LLAMA, run_cli

CHAT = [{"messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(3)]
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if not enable_thinking %}/no_think{% endif %}{% endif %}"
)


def model_copy(tmp_path, *, weights=True, template=True):
    folder = tmp_path / "model"
    shutil.copytree(TINY_LLAMA, folder)
    if not weights:
        (folder / "model.safetensors").unlink()
    if not template:
        (folder / "chat_template.jinja").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_model_folder_without_weights_fails_before_any_work(tmp_path, capsys):
    src = jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    model = model_copy(tmp_path, weights=False)
    code, out, err = run_cli(capsys, "run", src, "--model", model)
    assert code == 2 and "has no weights" in " ".join(err.split()) and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "model"]  # nothing written
    report, _ = plan_job(src, model)  # plan needs the tokenizer and config only
    assert report.summary.rows == 1


def test_chat_rows_without_a_chat_template_are_a_model_error_and_the_option_fixes_it(tmp_path, capsys):
    src = jsonl(tmp_path / "chat.jsonl", CHAT)
    model = model_copy(tmp_path, template=False)
    with pytest.raises(InputError, match="no chat template.*line 1.*--chat-template"):
        run_job(JobConfig(input=src, model=model, sampling={"max_tokens": 2}))
    assert not (tmp_path / "chat.out.jsonl").exists()
    template = tmp_path / "template.jinja"
    template.write_text(THINKING_TEMPLATE)
    code, _, err = run_cli(
        capsys, "run", src, "--model", model, "--max-tokens", "2", "--chat-template", template
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "chat.out.jsonl").read_text().splitlines()]
    assert [r["error"] for r in rows] == [None] * 3


def test_chat_template_kwargs_reach_the_template(tmp_path):
    src = jsonl(tmp_path / "chat.jsonl", CHAT)
    model = model_copy(tmp_path)
    (model / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    thinking, _ = plan_job(src, model, chat_template_kwargs={"enable_thinking": True})
    quiet, _ = plan_job(src, model, chat_template_kwargs={"enable_thinking": False})
    # "/no_think" is rendered only when the template is told enable_thinking = false
    assert quiet.summary.prompt_tokens > thinking.summary.prompt_tokens


def test_a_bad_chat_template_kwargs_option_is_a_usage_error(tmp_path, capsys):
    src = jsonl(tmp_path / "chat.jsonl", CHAT)
    code, _, err = run_cli(capsys, "run", src, "--chat-template-kwargs", "[1, 2]")
    assert code == 1 and "--chat-template-kwargs must be a JSON object" in " ".join(err.split())
