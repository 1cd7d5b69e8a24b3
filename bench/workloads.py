"""What the CPU benchmarks share: generated workloads and a random-weight Llama to run them on.

Workloads are built from random words with the bundled tokenizer; every function is
deterministic for a given seed, so two benchmarks (or two runs) see the same prompts:

* ``system`` — one long system prompt shared by every row, then a short question;
* ``docs`` — documents × 4 questions each (system ▸ document ▸ question), rows shuffled;
* ``fewshot`` — system ▸ one of 4 tasks' examples ▸ an input;
* ``unique`` — nothing shared (random prompts of the same length);
* ``mixed`` — docs, but a quarter of the rows are short prompts with 4× longer outputs.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "sample_jobs" / "models" / "tiny-llama"
WORKLOADS = ("system", "docs", "fewshot", "unique", "mixed")
WORDS = (
    "granite harbour lamp keeper ferry strait orchard frost blossom bakery rye starter flour "
    "river valley engine signal winter market ledger copper meadow lantern station harvest"
).split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_workload(name: str, rows: int, max_tokens: int, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt text, max_tokens) per row, in (shuffled) file order."""
    rng = random.Random(seed)
    system = "System: you are a careful analyst; answer from the text only. " + words(rng, 150)
    if name == "system":
        items = [(f"{system}\nQuestion {i}: {words(rng, 12)}?", max_tokens) for i in range(rows)]
    elif name in ("docs", "mixed"):
        docs = [words(rng, 220) for _ in range(-(-rows // 4))]
        items = [
            (f"{system}\nDocument: {docs[i // 4]}\nQuestion: {words(rng, 12)}?", max_tokens)
            for i in range(rows)
        ]
        if name == "mixed":
            for i in range(0, rows, 4):
                items[i] = (f"Write a long story about {words(rng, 8)}.", 4 * max_tokens)
    elif name == "fewshot":
        tasks = [f"Task {t} examples: {words(rng, 200)}" for t in range(4)]
        items = [
            (f"{system}\n{tasks[i % 4]}\nInput: {words(rng, 20)}\nOutput:", max_tokens) for i in range(rows)
        ]
    elif name == "unique":
        items = [(words(rng, 400), max_tokens) for _ in range(rows)]
    else:
        raise ValueError(name)
    rng.shuffle(items)
    return items


def make_model(
    folder: Path,
    *,
    num_key_value_heads: int = 4,
    intermediate_size: int = 1536,
    num_hidden_layers: int = 8,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random-weight Llama (hidden 512, 8 heads) saved in ``dtype`` with the bundled tokenizer.

    The defaults give ~27M parameters; 2 KV heads and an intermediate size of 2048 give ~32M."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=8,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(BUNDLED / name, folder / name)
    return folder
