"""Sampling: per-row seeds independent of batch composition, top-k/top-p, stop strings, EOS."""

from __future__ import annotations

import pytest

from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.engine import build_engine
from batchrun.core.engine.stop import StopChecker
from batchrun.core.params import SamplingParams
from batchrun.core.runner.model_loader import load_model
from batchrun.core.sched.request import Request


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(tiny_llama, device="cpu", dtype="float32")


def generate(loaded, prompts, params, **engine_kwargs):
    engine = build_engine(loaded, EngineConfig(**engine_kwargs))
    requests = [Request(i, p, params[i], seed=100 + i) for i, p in enumerate(prompts)]
    return {c.row: c for c in engine.generate(requests)}


def ids(loaded, *texts):
    return [loaded.tokenizer(t)["input_ids"] for t in texts]


def test_seeded_sample_does_not_depend_on_the_batch(loaded):
    prompts = ids(loaded, "Once upon a time", "The ferry crosses the strait", "def main():")
    params = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9)] * 3
    together = generate(loaded, prompts, params, token_budget=64)
    for i in range(3):
        alone = generate(loaded, [prompts[i]] * (i + 1), [params[i]] * (i + 1), token_budget=5)
        assert alone[i].token_ids == together[i].token_ids


def test_sampling_is_not_greedy(loaded):
    prompt = ids(loaded, "Once upon a time")
    greedy = generate(loaded, prompt, [SamplingParams(max_tokens=16)])[0].token_ids
    hot = [generate(loaded, prompt, [SamplingParams(max_tokens=16, temperature=2.0)])[0].token_ids]
    hot.append(
        generate(loaded, prompt * 2, [SamplingParams(max_tokens=16, temperature=2.0)] * 2)[1].token_ids
    )
    assert hot[0] != greedy and hot[0] != hot[1]  # different seeds (100 vs 101) differ too


def test_top_k_one_is_greedy(loaded):
    prompt = ids(loaded, "The orchard grows eleven apple varieties")
    greedy = generate(loaded, prompt, [SamplingParams(max_tokens=10)])[0].token_ids
    top1 = generate(loaded, prompt, [SamplingParams(max_tokens=10, temperature=1.5, top_k=1)])[0].token_ids
    assert top1 == greedy


def test_stop_string_cuts_the_text(loaded):
    prompt = ids(loaded, "Once upon a time")
    full = generate(loaded, prompt, [SamplingParams(max_tokens=20)])[0]
    stop = full.text[5:8]
    assert stop.strip(), "the greedy text is too short to pick a stop string from"
    cut = generate(loaded, prompt, [SamplingParams(max_tokens=20, stop=(stop,))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert len(cut.token_ids) < len(full.token_ids)


def test_eos_stops_unless_ignored(loaded):
    prompt = ids(loaded, "Once upon a time")
    first = generate(loaded, prompt, [SamplingParams(max_tokens=3)])[0].token_ids[0]
    engine = build_engine(loaded, EngineConfig())
    engine.stop_checker.eos_token_ids = frozenset({first})  # pretend the first token is EOS
    done = list(engine.generate([Request(0, prompt[0], SamplingParams(max_tokens=3))]))
    assert done[0].finish_reason == "stop" and done[0].token_ids == [first] and done[0].text == ""
    engine = build_engine(loaded, EngineConfig())
    engine.stop_checker.eos_token_ids = frozenset({first})
    done = list(engine.generate([Request(0, prompt[0], SamplingParams(max_tokens=3, ignore_eos=True))]))
    assert done[0].finish_reason == "length" and len(done[0].token_ids) == 3


def test_stop_strings_are_found_incrementally_and_the_text_decoded_once(loaded):
    """A stop string split over several tokens is caught at the token that completes it,
    with no full decode per token (O(L) per row): one decode, for the final text."""
    text = "The ferry leaves at noon.\nSTOP here, then the text goes on and on"
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    checker = StopChecker(loaded.tokenizer, eos_token_ids=[])
    decodes = []
    real = checker.decode
    checker.decode = lambda token_ids: decodes.append(len(token_ids)) or real(token_ids)
    params = SamplingParams(max_tokens=len(ids), stop=("STOP", "never"))
    state, output, verdict = checker.new_state(), [], None
    for token in ids:
        output.append(token)
        verdict = checker.check(params, output, state)
        if verdict is not None:
            break
    assert verdict == ("stop", "The ferry leaves at noon.\n")
    assert real(output).endswith("STOP") and len(output) < len(ids)
    assert decodes == [len(output)]
