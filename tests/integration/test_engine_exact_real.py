"""Bit-exactness on the real SmolLM2, at every precision the engine offers (`ENGINE_PRECISIONS` in
tests/conftest.py): a row's logits never depend on how many rows share its pass. This is what makes greedy
speculative output token-identical to plain greedy output (not merely close: a near-tie may not flip) and a
request's output the same whatever else the runtime batches with it.

- verify rows: the full pass over [cur, d_1..d_{M-1}] (M = 1..8) gives, row for row, the logits plain
  decoding computes one token at a time, bit for bit;
- batched rows: sequences verified together (with a prefill chunk of another request in the same pass)
  get the rows they get alone, bit for bit;
- the runtime: every target row the scheduler hands to the acceptance step, for a sampled request with the
  shipped general config decoding beside other requests, equals plain one-token decoding of the same tokens
  at the same positions, and the request's K/V holds exactly its committed tokens at every step.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import DraftConfig, RuntimeSettings, SamplingParams
from engine.draft import Draft
from engine.lean import Segment
from engine.named_configs import ABLATION_CONFIGS
from tests.spec_sampling import at_context, context_kv

pytestmark = pytest.mark.slow

SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=8)  # sampled requests' verify segments return logits
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Why is the sky blue?",
    "Translate into Spanish: The library opens at nine in the morning.",
]


def _plain_rows(lean, context: list[int], kv: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits plain decoding computes after each of `tokens`, fed one at a time from position
    len(context) - 1 on (the one-row segment a plain step builds), on a copy of the context's K/V."""
    cache = lean.new_cache(len(context) + len(tokens))
    cache.kv[:, :, :, : kv.shape[3]] = kv
    rows = []
    with torch.inference_mode():
        for j, t in enumerate(tokens):
            seg = Segment(cache, len(context) - 1 + j, torch.tensor([t], device=lean.device), "all")
            rows.append(lean.forward_batch([seg])[0])
    return torch.cat(rows)


def test_verify_logits_equal_solo_plain_logits_for_1_to_8_rows(engine_at_precision):
    eng = engine_at_precision
    lean = eng.lean
    prompt = eng.encode_prompt(prompt=PROMPTS[0])
    chain = eng.generate(prompt, SamplingParams(max_new_tokens=8)).token_ids  # plain greedy continuation
    assert len(chain) == 8
    context = prompt + chain[:1]  # the request stands at its first output token, as after its prefill
    kv = context_kv(lean, context)
    plain = _plain_rows(lean, context, kv, chain)  # [8, V]
    assert plain.argmax(-1).tolist()[:7] == chain[1:]  # the rows are the plain greedy decode's own
    for m in range(1, 9):
        seq = at_context(lean, context, kv, SAMPLED, DraftConfig(max_draft=8))
        seg = seq.verify_segment(Draft(torch.tensor(chain[1:m], dtype=torch.long), None, "lookup"))
        with torch.inference_mode():
            rows = lean.forward_batch([seg])[0]
        assert rows.shape == (m, lean.vocab)
        assert torch.equal(rows, plain[:m]), (m, (rows - plain[:m]).abs().max().item())


def test_batched_rows_equal_solo_rows(engine_at_precision):
    """Three requests verify 3, 5 and 8 rows in one pass together with a fourth request's prefill chunk;
    each gets the rows it gets alone."""
    eng = engine_at_precision
    lean = eng.lean
    contexts, drafts = [], []
    for prompt, m in zip(PROMPTS, (3, 5, 8)):
        ids = eng.encode_prompt(prompt=prompt)
        out = eng.generate(ids, SamplingParams(max_new_tokens=m)).token_ids
        contexts.append(ids + out[:1])
        drafts.append(torch.tensor(out[1:m], dtype=torch.long))
    kvs = [context_kv(lean, c) for c in contexts]

    def verify(idx: list[int], extra_prefill: bool) -> list[torch.Tensor]:
        seqs = [at_context(lean, contexts[i], kvs[i], SAMPLED, DraftConfig(max_draft=8)) for i in idx]
        segs = [s.verify_segment(Draft(drafts[i], None, "lookup")) for s, i in zip(seqs, idx)]
        if extra_prefill:
            other = eng.sequence(eng.encode_prompt(prompt="Tell me a short story about a fox."), SAMPLED)
            segs.append(other.prefill_segment(128))
        with torch.inference_mode():
            return lean.forward_batch(segs)[: len(idx)]

    solo = [verify([i], False)[0] for i in range(3)]
    together = verify([0, 1, 2], True)
    reverse = verify([2, 1, 0], False)[::-1]
    for i in range(3):
        assert solo[i].shape[0] == drafts[i].shape[0] + 1
        assert torch.equal(together[i], solo[i]), i
        assert torch.equal(reverse[i], solo[i]), i


def _record(seq) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Every verify this sequence goes through: (pos, cur, drafted tokens, the target rows it was given)."""
    steps = []
    accept = seq.after_verify

    def recorded(draft, logits, *args):
        steps.append((seq.pos, seq.cur, draft.tokens.clone(), logits.clone()))
        return accept(draft, logits, *args)

    seq.after_verify = recorded
    return steps


def _decode(eng, prompt: list[int], params: SamplingParams, company: bool):
    sched = eng.scheduler(RuntimeSettings(max_running=4, load_aware=False))
    mine = eng.sequence(prompt, params, ABLATION_CONFIGS["int4+vocab8k+lookup2+adaptive"])
    steps = _record(mine)
    seqs = [mine]
    if company:
        others = [
            (PROMPTS[0], SamplingParams(max_new_tokens=20), DraftConfig(skip_mlp=(22, 24, 26, 27), max_draft=4)),
            (PROMPTS[2], SamplingParams(max_new_tokens=12), DraftConfig(prompt_lookup=3, model_draft=False)),
            (PROMPTS[1], SamplingParams(max_new_tokens=16, temperature=0.8, seed=3), DraftConfig(max_draft=3)),
        ]
        seqs += [eng.sequence(eng.encode_prompt(prompt=p), sp, c) for p, sp, c in others]
    for s in seqs:
        sched.submit(s)
    while sched.has_work():
        sched.step()
    assert max(s.stats.max_batch for s in seqs) == len(seqs)
    return [t for o in mine.outbox for t in o.token_ids], steps, mine.stats


def test_every_target_row_the_runtime_uses_equals_plain_decoding(engine_at_precision):
    eng = engine_at_precision
    lean = eng.lean
    prompt = eng.encode_prompt(prompt="Summarize in one sentence: The city council met on Monday to discuss the new "
                               "park. Residents asked for more trees and a playground. The council agreed to fund "
                               "both next year.")
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=11, max_new_tokens=24)
    tokens, steps, stats = _decode(eng, prompt, params, company=True)
    alone, alone_steps, _ = _decode(eng, prompt, params, company=False)
    assert stats.drafted > 0 and stats.accepted > 0 and len(steps) >= 5
    # batched == solo, row for row (seeded sampling draws the same tokens, so the steps line up)
    assert alone == tokens and len(alone_steps) == len(steps)
    for (pos, cur, d, rows), (pos2, cur2, d2, rows2) in zip(steps, alone_steps):
        assert (pos, cur) == (pos2, cur2) and torch.equal(d, d2) and torch.equal(rows, rows2)

    # every row equals plain one-token decoding at its position, over a K/V holding exactly the committed tokens
    committed = prompt + tokens
    cache = lean.new_cache(len(committed) + 16)
    with torch.inference_mode():
        lean.forward_batch([Segment(cache, 0, torch.tensor(prompt, device=lean.device), "none", exact=False)])
        for pos, cur, drafted, rows in steps:
            assert committed[pos] == cur  # the step feeds the last committed token at its own position
            feed = [cur, *drafted.tolist()]
            assert rows.shape[0] == len(feed)
            for j, t in enumerate(feed):
                plain = lean.forward_batch([Segment(cache, pos + j, torch.tensor([t], device=lean.device), "all")])[0]
                assert torch.equal(rows[j], plain[0]), (pos, j)
