"""Build the bundled sample checkpoint ``sample_jobs/models/tiny-llama``.

It is a real Hugging Face checkpoint (config, byte-level BPE ``tokenizer.json``,
safetensors weights, ChatML chat template) with **random weights**: it exercises every
code path of batchrun offline, but its generations are not meaningful text.

The tokenizer is trained on text that ships with Python (``pydoc_data.topics``, the
library reference), so the script needs no network. The weights come from a fixed seed.

    python sample_jobs/make_tiny_model.py            # writes sample_jobs/models/tiny-llama
    python sample_jobs/make_tiny_model.py --out DIR
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def training_text() -> list[str]:
    """Paragraphs of the Python library reference, shipped with every CPython."""
    paragraphs = []
    for topic in sorted(pydoc_data.topics.topics):
        paragraphs.extend(p for p in pydoc_data.topics.topics[topic].split("\n\n") if p.strip())
    return paragraphs


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # A wider init than the default 0.02 gives peaked next-token distributions, so
        # greedy decoding is far from ties and the outputs are stable across kernels.
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "models" / "tiny-llama")
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    # bfloat16 on disk halves the checkpoint; batchrun runs it in float32 on CPU.
    model.to(torch.bfloat16).save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB, {model.num_parameters() / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()
