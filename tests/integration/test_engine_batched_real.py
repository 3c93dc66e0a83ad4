"""The batching runtime on the real bundled SmolLM2: lossless whatever shares the batch."""

from __future__ import annotations

import pytest

from engine.config import DraftConfig, RuntimeSettings, SamplingParams

pytestmark = pytest.mark.slow

REQUESTS = [
    ("Write a Python function that returns the n-th Fibonacci number.", 40,
     DraftConfig(quantize="int8", max_draft=6, confidence=0.3)),
    ("Summarize in one sentence: The city council met on Monday to discuss the new park. Residents asked for "
     "more trees and a playground. The council agreed to fund both next year.", 24,
     DraftConfig(prompt_lookup=3, model_draft=False, max_draft=8)),
    ("Why is the sky blue?", 32, DraftConfig(skip_mlp=(22, 24, 26, 27), max_draft=4, confidence=0.5)),
    ("Translate into Spanish: The library opens at nine in the morning.", 16,
     DraftConfig(quantize="int4", draft_vocab=8192, prompt_lookup=2, adaptive=True, max_draft=6)),
]


def _drain(sched, seqs):
    while sched.has_work():
        sched.step()
    return [[t for o in s.outbox for t in o.token_ids] for s in seqs]


def test_four_concurrent_requests_with_different_configs_give_their_solo_plain_output(smollm2):
    ids = [smollm2.encode_prompt(prompt=p) for p, _, _ in REQUESTS]
    solo = [smollm2.generate(x, SamplingParams(max_new_tokens=n), DraftConfig.plain()).token_ids
            for x, (_, n, _) in zip(ids, REQUESTS)]
    # load-aware capping off: every config must really draft here (the cap is tested on its own)
    sched = smollm2.scheduler(RuntimeSettings(max_running=4, prefill_chunk=32, load_aware=False))
    seqs = [smollm2.sequence(x, SamplingParams(max_new_tokens=n), cfg) for x, (_, n, cfg) in zip(ids, REQUESTS)]
    for s in seqs:
        sched.submit(s)
    assert _drain(sched, seqs) == solo
    assert all(s.stats.max_batch == 4 for s in seqs)
    assert all(s.stats.drafted > 0 for s in seqs)


def test_cancelled_request_frees_its_slot_and_the_others_are_unaffected(smollm2):
    ids = [smollm2.encode_prompt(prompt=p) for p, _, _ in REQUESTS[:3]]
    solo = [smollm2.generate(x, SamplingParams(max_new_tokens=20), DraftConfig.plain()).token_ids for x in ids]
    # load-aware capping off: the requests must really draft while they share the batch
    sched = smollm2.scheduler(RuntimeSettings(max_running=2, load_aware=False))
    seqs = [smollm2.sequence(x, SamplingParams(max_new_tokens=20), cfg) for x, (_, _, cfg) in zip(ids, REQUESTS)]
    for s in seqs:
        sched.submit(s)
    for _ in range(3):
        sched.step()
    assert seqs[2] in sched.waiting and seqs[0].produced > 0
    seqs[0].cancel()
    sched.step()
    assert seqs[0].finish_reason == "cancelled" and seqs[2] in sched.running
    out = _drain(sched, seqs)
    assert out[1:] == solo[1:]
    assert all(s.stats.drafted > 0 and s.stats.accepted > 0 for s in seqs[1:])


def test_seeded_sampling_is_reproducible_under_concurrency(smollm2):
    params = SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.95, seed=5)
    x = smollm2.encode_prompt(prompt="Tell me a short story about a fox.")
    cfg = DraftConfig(quantize="int8", prompt_lookup=2, max_draft=5, confidence=0.2)
    alone = smollm2.generate(x, params, cfg).token_ids
    # load-aware capping off, so the greedy neighbours draft too (sampled requests are never capped)
    sched = smollm2.scheduler(RuntimeSettings(max_running=4, load_aware=False))
    others = [smollm2.sequence(smollm2.encode_prompt(prompt=p), SamplingParams(max_new_tokens=n), c)
              for p, n, c in REQUESTS[:3]]
    mine = smollm2.sequence(x, params, cfg)
    seqs = [others[0], mine, *others[1:]]
    for s in seqs:
        sched.submit(s)
    assert _drain(sched, seqs)[1] == alone
    assert mine.stats.max_batch == 4
    assert all(s.stats.drafted > 0 for s in seqs), [s.stats.drafted for s in seqs]
    assert mine.stats.accepted > 0


def test_cheap_head_argmax_equals_the_fp32_head_on_every_position_of_a_long_decode(smollm2_ref):
    """The exact greedy head (int8 scores + fp32 recheck) against the full fp32 head, position by position
    (the reference precision's head; the native precision's head is its packed Q8_0 weights)."""
    import torch

    smollm2 = smollm2_ref
    lean = smollm2.lean
    assert lean.greedy_head is not None
    ids = smollm2.encode_prompt(prompt="Write a long, detailed essay about the history of the printing press.")
    out = smollm2.generate(ids, SamplingParams(max_new_tokens=300), DraftConfig.plain()).token_ids
    seq = torch.tensor(ids + out)
    with torch.inference_mode():
        h = lean.hidden(seq, 0, cache=lean.new_cache(len(seq)))  # [L, hidden]
        full = lean.lm_head(h).argmax(-1)
        cheap = torch.cat([lean.greedy_head.argmax(h[i : i + 1]) for i in range(len(seq))])  # as plain decoding
        many = lean.greedy_head.argmax(h, lean.lm_head)  # as verification
    assert len(seq) > 300 and torch.equal(cheap, full) and torch.equal(many, full)
    assert lean.greedy_head.candidates < 100 * lean.greedy_head.rows  # tens of rechecks per position, not 49k
