"""Lossless self-speculative decoding on the real bundled SmolLM2-135M."""

from __future__ import annotations

import pytest
import torch

from engine.config import DraftConfig, SamplingParams
from engine.decode import PromptTooLongError

pytestmark = pytest.mark.slow

PROMPTS = {
    "math": "A farmer has 12 cows and buys 7 more, then sells 5. How many cows does he have?",
    "code": "Write a Python function that returns the n-th Fibonacci number.",
    "summarize": "Summarize in one sentence: The city council met on Monday to discuss the new park. "
    "Residents asked for more trees and a playground. The council agreed to fund both next year.",
    "translate": "Translate into Spanish: The library opens at nine in the morning.",
    "qa": "Why is the sky blue?",
}
CONFIGS = {
    "few": DraftConfig(skip_mlp=(26, 27), skip_attn=(25,), max_draft=4, confidence=0.5),
    "many": DraftConfig(skip_attn=tuple(range(4, 28, 2)), skip_mlp=tuple(range(5, 29, 2)), max_draft=6, confidence=0.0),
    "zero": DraftConfig(max_draft=4),  # speculation on but nothing skipped: the draft is the full model
}
# Issue 3's knobs, each alone and combined: output must stay identical whatever the draft does.
KNOBS = {
    "int8": DraftConfig(quantize="int8", max_draft=6, confidence=0.3),
    "vocab-subset": DraftConfig(skip_mlp=(26, 27), draft_vocab=8192, max_draft=4),
    "prompt-lookup": DraftConfig(prompt_lookup=3, skip_mlp=(24, 26, 27), max_draft=5),
    "lookup-only-adaptive": DraftConfig(prompt_lookup=2, model_draft=False, max_draft=8, adaptive=True),
    "adaptive": DraftConfig(skip_attn=(20, 24), skip_mlp=(22, 26), adaptive=True, max_draft=6),
    "combined": DraftConfig(
        quantize="int8", draft_vocab=8192, prompt_lookup=3, adaptive=True, skip_mlp=(27,), max_draft=6
    ),
}


def test_lean_logits_match_transformers(smollm2_ref):
    ids = smollm2_ref.encode_prompt(prompt=PROMPTS["qa"])
    with torch.no_grad():
        ref = smollm2_ref.hf_model(torch.tensor([ids])).logits[0]
    with torch.inference_mode():
        lean = smollm2_ref.lean.forward(torch.tensor(ids), 0)
    assert (lean - ref).abs().max() < 1e-3


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_greedy_speculative_is_token_identical(smollm2, kind):
    ids = smollm2.encode_prompt(prompt=PROMPTS[kind])
    params = SamplingParams(max_new_tokens=32)
    plain = smollm2.generate(ids, params, DraftConfig.plain())
    assert plain.stats.new_tokens == len(plain.token_ids) > 0
    spec = {name: smollm2.generate(ids, params, cfg) for name, cfg in CONFIGS.items()}
    for name, r in spec.items():
        assert r.token_ids == plain.token_ids, (kind, name)
        assert r.text == plain.text
        assert r.stats.drafted > 0, name
    # The zero-skip draft is the full model itself, so (nearly) every drafted token is accepted.
    assert spec["zero"].stats.acceptance_rate > 0.95


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_draft_knobs_are_lossless(smollm2, knob):
    ids = smollm2.encode_prompt(prompt=PROMPTS["summarize"])  # copy-heavy, so prompt lookup fires
    params = SamplingParams(max_new_tokens=32)
    plain = smollm2.generate(ids, params, DraftConfig.plain())
    spec = smollm2.generate(ids, params, KNOBS[knob])
    assert spec.token_ids == plain.token_ids
    assert spec.stats.accepted > 0


def test_plain_matches_hf_generate(smollm2_ref):
    smollm2 = smollm2_ref  # transformers computes in fp32 on the dequantised weights: the reference precision
    ids = smollm2.encode_prompt(prompt=PROMPTS["code"])
    hf = smollm2.hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    ours = smollm2.generate(ids, SamplingParams(max_new_tokens=24))
    # transformers keeps the EOS it stopped at; the engine stops before it (finish_reason "stop")
    ended = next((i for i, t in enumerate(hf) if t in smollm2.eos_token_ids), None)
    assert ours.token_ids == hf[:ended] and len(ours.token_ids) > 0
    assert ours.finish_reason == ("length" if ended is None else "stop")


def test_int8_draft_weights_add_135_mb(smollm2_ref):
    """The README's memory figure for `quantize: "int8"`: weight-only int8 copies of the 30 layers'
    projections plus an int8 LM head (one byte per weight, a bf16 scale per row), beside the fp32 weights."""
    lean = smollm2_ref.lean  # int8 draft copies exist at the reference precision (native drafts reuse its blocks)
    plan = lean.plan(precision="int8")
    layers = sum(lw.proj["int8"].nbytes for lw in lean.layers)
    assert plan.head is not None and plan.precision == "int8"
    added = layers + plan.head.linear.nbytes
    assert 134e6 < added < 136e6, added


def test_seeded_sampling_is_reproducible(smollm2):
    ids = smollm2.encode_prompt(prompt=PROMPTS["qa"])
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    a = smollm2.generate(ids, params, CONFIGS["many"])
    b = smollm2.generate(ids, params, CONFIGS["many"])
    c = smollm2.generate(ids, params.model_copy(update={"seed": 99}), CONFIGS["many"])
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stops_eos_length_and_stop_strings(smollm2):
    ids = smollm2.encode_prompt(prompt="Say hello.")
    r = smollm2.generate(ids, SamplingParams(max_new_tokens=200), CONFIGS["few"])
    assert r.finish_reason == "stop" and len(r.token_ids) < 200  # EOS
    r = smollm2.generate(ids, SamplingParams(max_new_tokens=3), CONFIGS["few"])
    assert r.finish_reason == "length" and len(r.token_ids) == 3
    full = smollm2.generate(smollm2.encode_prompt(prompt=PROMPTS["qa"]), SamplingParams(max_new_tokens=30))
    word = full.text.split()[3]
    cut = smollm2.generate(
        smollm2.encode_prompt(prompt=PROMPTS["qa"]), SamplingParams(max_new_tokens=30, stop=(word,)), CONFIGS["few"]
    )
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(word)]
    streamed = list(smollm2.stream(smollm2.encode_prompt(prompt=PROMPTS["qa"]), SamplingParams(max_new_tokens=30)))
    assert "".join(s.text for s in streamed) == full.text and streamed[-1].finish_reason == "length"


def test_context_limit(smollm2):
    too_long = [1] * smollm2.context_length
    with pytest.raises(PromptTooLongError, match="context"):
        smollm2.generate(too_long, SamplingParams(max_new_tokens=4))
    # A prompt that nearly fills the context stops with "length" when the context is full.
    near = smollm2.tokenizer("hello " * 2000).input_ids[: smollm2.context_length - 3]
    r = smollm2.generate(near, SamplingParams(max_new_tokens=50), CONFIGS["few"])
    assert r.finish_reason == "length" and len(r.token_ids) <= 3
