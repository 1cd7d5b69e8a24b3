"""Sampling: per-row seeds independent of batch composition, top-k/top-p, stop strings, EOS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.engine import build_engine
from batchrun.core.engine.stop import StopChecker
from batchrun.core.params import SamplingParams
from batchrun.core.runner.model_loader import load_model
from batchrun.core.runner.sampler import History, apply_penalties, sample, sample_rows
from batchrun.core.sched.request import Request

from helpers import reference_generate


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


def test_repetition_penalty_equals_transformers_generate(loaded, tiny_llama):
    """vLLM's repetition penalty is transformers' (prompt and output, divide positive logits,
    multiply negative ones), so the oracle covers it. The random model never repeats a token
    greedily, so a penalty below 1 (rewarding repeats) is what changes its text."""
    prompts = ids(loaded, "The lighthouse keeper", "Once upon a time, once upon a time")
    expected = reference_generate(tiny_llama, prompts, [12, 12], repetition_penalty=0.2)
    plain = reference_generate(tiny_llama, prompts, [12, 12])
    assert expected[0] != plain[0] and expected[1] != plain[1], "the penalty should change the text"
    got = generate(loaded, prompts, [SamplingParams(max_tokens=12, repetition_penalty=0.2)] * 2)
    assert [got[0].token_ids, got[1].token_ids] == expected


def test_presence_and_frequency_penalties_follow_the_output_counts():
    logits = torch.zeros(1, 6)
    history = History(prompt=np.array([5, 5]), output=np.array([1, 1, 1, 3]))
    apply_penalties(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [history])
    # token 1: 3 x 0.25 + 0.5; token 3: 0.25 + 0.5; prompt-only token 5 is not touched
    assert logits.tolist() == [[0.0, -1.25, 0.0, -0.75, 0.0, 0.0]]


def test_penalties_of_a_batch_are_each_rows_own():
    """All rows at once (mixed penalties, empty outputs, a row with none) give what each row
    gets alone, bit for bit: vLLM's formulas applied row by row are the reference."""
    torch.manual_seed(2)
    logits = torch.randn(4, 12)
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.2),
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=0.1, presence_penalty=0.4),
        SamplingParams(),
    ]
    histories = [
        History(np.array([1, 2, 3]), np.array([3, 3, 7])),
        History(np.array([4]), np.array([], dtype=np.int64)),
        History(np.array([0, 11]), np.array([5, 0, 5, 5])),
        History(np.array([6]), np.array([6, 6])),
    ]
    batched = logits.clone()
    apply_penalties(batched, params, histories)
    for row, (p, h) in enumerate(zip(params, histories, strict=True)):
        want = logits[row].clone()
        counts = torch.bincount(torch.from_numpy(h.output), minlength=12).float()
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[torch.from_numpy(h.prompt)] = True
            penalized = torch.where(want > 0, want / p.repetition_penalty, want * p.repetition_penalty)
            want = torch.where(seen, penalized, want)
        want -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        assert torch.equal(batched[row], want), row
    assert not torch.equal(batched[0], logits[0]) and torch.equal(batched[3], logits[3] - 0.0)


def test_min_tokens_masks_eos_and_stop_tokens_then_they_end_the_row(loaded):
    prompt = ids(loaded, "Once upon a time")
    greedy = generate(loaded, prompt, [SamplingParams(max_tokens=6)])[0].token_ids
    engine = build_engine(loaded, EngineConfig())
    engine.stop_checker.eos_token_ids = frozenset({greedy[0]})  # pretend the first token is EOS
    engine.runner.eos_token_ids = (greedy[0],)
    params = SamplingParams(max_tokens=6, min_tokens=3, stop_token_ids=(greedy[0],))
    (done,) = engine.generate([Request(0, prompt[0], params)])
    assert greedy[0] not in done.token_ids[:3]  # masked while below min_tokens
    assert done.finish_reason in ("stop", "length")
    if done.finish_reason == "stop":
        assert done.token_ids[-1] == greedy[0] and len(done.token_ids) > 3


def test_a_stop_token_ends_the_row_and_shows_only_when_asked(loaded):
    prompt = ids(loaded, "Once upon a time")
    full = generate(loaded, prompt, [SamplingParams(max_tokens=8)])[0]
    stop = full.token_ids[3]
    cut = generate(loaded, prompt, [SamplingParams(max_tokens=8, stop_token_ids=(stop,))])[0]
    first = full.token_ids.index(stop)
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[: first + 1]
    shown = generate(
        loaded,
        prompt,
        [SamplingParams(max_tokens=8, stop_token_ids=(stop,), include_stop_str_in_output=True)],
    )[0]
    assert loaded.tokenizer.decode(cut.token_ids[:-1], skip_special_tokens=True) == cut.text
    assert shown.text == loaded.tokenizer.decode(cut.token_ids, skip_special_tokens=True)


def test_min_p_one_is_greedy(loaded):
    prompt = ids(loaded, "The orchard grows eleven apple varieties")
    greedy = generate(loaded, prompt, [SamplingParams(max_tokens=10)])[0].token_ids
    only_top = generate(loaded, prompt, [SamplingParams(max_tokens=10, temperature=1.5, min_p=1.0)])[0]
    assert only_top.token_ids == greedy


def test_logprobs_carry_each_tokens_text(loaded):
    prompt = ids(loaded, "Once upon a time")
    done = generate(loaded, prompt, [SamplingParams(max_tokens=3, logprobs=2)])[0]
    first = done.logprobs[0]
    assert first["token"] == done.token_ids[0] and first["text"] == loaded.tokenizer.decode([first["token"]])
    assert [t["text"] for t in first["top"]] == [loaded.tokenizer.decode([t["token"]]) for t in first["top"]]


def draw_frequencies(probs: list[float], draws: int, **params) -> torch.Tensor:
    """Empirical distribution of ``sample_rows`` over many output positions of one row."""
    logits = torch.log(torch.tensor([probs] * draws))
    p = SamplingParams(temperature=1.0, **params)
    tokens = sample_rows(logits, [p] * draws, [7] * draws, list(range(draws)))
    return torch.bincount(tokens, minlength=len(probs)) / draws


def test_batched_sampling_draws_from_the_filtered_distribution():
    probs = [0.5, 0.3, 0.15, 0.05]
    full = draw_frequencies(probs, 20000)
    assert torch.allclose(full, torch.tensor(probs), atol=0.02), full
    nucleus = draw_frequencies(probs, 20000, top_p=0.7)  # keeps 0.5 and 0.3, renormalised
    assert torch.allclose(nucleus, torch.tensor([0.625, 0.375, 0, 0]), atol=0.02), nucleus
    floor = draw_frequencies(probs, 20000, min_p=0.25)  # drops what is below 0.125
    assert torch.allclose(floor, torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.02), floor
    assert draw_frequencies(probs, 500, top_k=2)[2:].sum() == 0


def test_a_rows_sample_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.8, top_p=0.9)] * 6
    seeds, positions = [11, 12, 13, 14, 15, 16], [0, 3, 5, 7, 9, 2]
    together = sample_rows(logits, params, seeds, positions)
    alone = [
        sample_rows(logits[i : i + 1], params[:1], seeds[i : i + 1], positions[i : i + 1]) for i in range(6)
    ]
    assert together.tolist() == [int(a) for a in alone]
    shuffled = [5, 2, 0, 4, 1, 3]
    again = sample_rows(
        logits[shuffled], params, [seeds[i] for i in shuffled], [positions[i] for i in shuffled]
    )
    assert again.tolist() == [together[i].item() for i in shuffled]


def test_sampling_in_chunks_of_rows_draws_the_same_tokens():
    """``sample`` bounds its workspace by drawing (and penalising) a few rows at a time: same
    tokens, greedy and penalised rows mixed in, for any chunk size."""
    torch.manual_seed(1)
    logits = torch.randn(9, 50)
    params = [SamplingParams(temperature=0.9, top_k=20) if i % 3 else SamplingParams() for i in range(9)]
    params[4] = SamplingParams(temperature=0.9, repetition_penalty=1.5, frequency_penalty=0.3)
    params[6] = SamplingParams(presence_penalty=2.0, min_tokens=20)  # greedy, EOS (49) masked
    seeds = list(range(100, 109))
    histories = [History(np.array([1, 2]), np.arange(i)) for i in range(9)]
    logits[6, 49] = 100.0  # EOS would win row 6 but for min_tokens
    whole = sample(logits.clone(), params, seeds, histories, eos_token_ids=(49,))
    for rows_per_chunk in (1, 2, 4):
        chunk = rows_per_chunk * 50
        assert sample(logits.clone(), params, seeds, histories, (49,), chunk_elements=chunk) == whole
    assert whole[6] != 49
    assert whole[0] == int(logits[0].argmax()) and whole[3] == int(logits[3].argmax())
