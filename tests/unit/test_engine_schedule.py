"""The batching runtime on a tiny random model: lossless under batching, cancellation, seeded sampling,
chunked prefill, a bounded queue, the load-aware cap, and the decode loop itself."""

from __future__ import annotations

import pytest
import torch

from engine.config import DraftConfig, RuntimeSettings, SamplingParams
from engine.costs import PassCosts, SeqOutlook, expected_tokens, speculation_cap
from engine.lean import FULL
from engine.schedule import QueueFull
from tests.tiny import tiny_engine

CONFIGS = [
    DraftConfig.plain(),
    DraftConfig(skip_mlp=(2,), max_draft=4, confidence=0.0),
    DraftConfig(quantize="int8", max_draft=3, confidence=0.0),
    DraftConfig(prompt_lookup=2, model_draft=False, max_draft=5),
    DraftConfig(quantize="int4", draft_vocab=64, prompt_lookup=2, adaptive=True, max_draft=6),
    DraftConfig(skip_attn=(1,), skip_mlp=(2,), max_draft=2, confidence=0.0),
]


@pytest.fixture(scope="module")
def eng():
    # one thread: tiny matmuls gain nothing from two, and on a busy machine OpenMP barriers cost ms each
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_engine()
    torch.set_num_threads(threads)


def _prompt(i: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + i)
    base = torch.randint(2, 128, (max(n // 3, 2),), generator=g).tolist()
    return (base * 4)[:n]  # repeats, so prompt lookup finds matches


def _run(eng, reqs, settings=None):
    """Decode (prompt, params, config) requests together on one scheduler; returns their token ids."""
    sched = eng.scheduler(settings or RuntimeSettings(max_running=8, prefill_chunk=16, prefill_rows=32))
    seqs = [eng.sequence(p, sp, c) for p, sp, c in reqs]
    for s in seqs:
        sched.submit(s)
    steps = 0
    while sched.has_work():
        sched.step()
        steps += 1
        assert steps < 10_000
    out = []
    for s in seqs:
        toks = [t for o in s.outbox for t in o.token_ids]
        assert s.outbox[-1].finish_reason in ("stop", "length")
        out.append(toks)
    return out, seqs


def test_batched_greedy_output_is_each_request_solo_plain_output(eng):
    lengths = [5, 40, 11, 23, 70, 3]
    reqs = [(_prompt(i, n), SamplingParams(max_new_tokens=12 + 5 * i), CONFIGS[i]) for i, n in enumerate(lengths)]
    solo = [eng.generate(p, sp, DraftConfig.plain()).token_ids for p, sp, _ in reqs]
    batched, seqs = _run(eng, reqs)
    assert batched == solo
    assert max(s.stats.max_batch for s in seqs) == len(reqs)
    assert sum(s.stats.drafted for s in seqs) > 0 and sum(s.stats.accepted for s in seqs) > 0


def test_decode_loop_alone_matches_plain_for_every_knob(eng):
    p = _prompt(7, 30)
    sp = SamplingParams(max_new_tokens=40)
    plain = eng.generate(p, sp, DraftConfig.plain())
    assert plain.stats.new_tokens == len(plain.token_ids) > 0
    for cfg in CONFIGS[1:]:
        r = eng.generate(p, sp, cfg)
        assert r.token_ids == plain.token_ids, cfg
        assert r.text == plain.text


def test_cancelled_request_frees_its_slot_and_others_are_unaffected(eng):
    sp = SamplingParams(max_new_tokens=30)
    reqs = [(_prompt(i, 12), sp, CONFIGS[i % 3]) for i in range(3)]
    solo = [eng.generate(p, sp, DraftConfig.plain()).token_ids for p, sp, _ in reqs]
    sched = eng.scheduler(RuntimeSettings(max_running=2))
    seqs = [eng.sequence(p, s, c) for p, s, c in reqs]
    for s in seqs:
        sched.submit(s)
    sched.step()
    sched.step()
    assert seqs[0] in sched.running and seqs[2] in sched.waiting  # two slots
    seqs[0].cancel()
    sched.step()
    assert seqs[0].finish_reason == "cancelled" and seqs[0] not in sched.running
    assert seqs[2] in sched.running  # took the freed slot at once
    while sched.has_work():
        sched.step()
    for j in (1, 2):
        assert [t for o in seqs[j].outbox for t in o.token_ids] == solo[j]


def test_seeded_sampling_is_reproducible_under_concurrency(eng):
    sp = SamplingParams(max_new_tokens=25, temperature=0.9, top_p=0.95, seed=11)
    p = _prompt(3, 20)
    cfg = CONFIGS[4]
    alone = eng.generate(p, sp, cfg).token_ids
    others = [(_prompt(i, 9 + i), SamplingParams(max_new_tokens=20), CONFIGS[i % len(CONFIGS)]) for i in range(5)]
    batched, _ = _run(eng, [*others[:2], (p, sp, cfg), *others[2:]])
    assert batched[2] == alone
    assert eng.generate(p, sp.model_copy(update={"seed": 12}), cfg).token_ids != alone


def test_long_prompt_prefills_in_chunks_while_others_decode(eng):
    sched = eng.scheduler(RuntimeSettings(max_running=4, prefill_chunk=16, prefill_rows=16))
    long = eng.sequence(_prompt(1, 200), SamplingParams(max_new_tokens=4), DraftConfig.plain())
    short = eng.sequence(_prompt(2, 6), SamplingParams(max_new_tokens=30), DraftConfig.plain())
    sched.submit(long)
    sched.submit(short)
    sched.step()  # one chunk each: the short prompt is prefilled, the long one has 16 of 200 tokens
    steps = 0
    while long.prefilling:
        sched.step()
        steps += 1
    assert steps >= 200 // 16 - 1
    assert short.produced >= steps  # it got a token at every iteration of the long prefill


def test_full_queue_is_refused_at_once(eng):
    sched = eng.scheduler(RuntimeSettings(max_running=1, max_waiting=1))
    mk = lambda: eng.sequence(_prompt(0, 5), SamplingParams(max_new_tokens=5), DraftConfig.plain())  # noqa: E731
    sched.submit(mk())
    sched.step()
    sched.submit(mk())
    with pytest.raises(QueueFull):
        sched.submit(mk())


def test_load_aware_cap_turns_drafts_off_when_rows_are_expensive(eng):
    """With measured costs where every extra row is as dear as a pass, drafting cannot pay for a batch:
    the cap switches it off, the stats say so, and the output is unchanged."""
    reqs = [(_prompt(i, 10), SamplingParams(max_new_tokens=15), CONFIGS[1]) for i in range(4)]
    solo = [eng.generate(p, sp, DraftConfig.plain()).token_ids for p, sp, _ in reqs]
    eng_costs = eng.costs
    try:
        eng.costs = PassCosts()
        for rows in (1, 2, 4, 8, 16, 32):
            eng.costs.observe(FULL.key, rows, 0.01 * rows)
        plan_key = eng.lean.plan((), (2,)).key
        for rows in (1, 2, 4, 8):
            eng.costs.observe(plan_key, rows, 0.01 * rows)
        eng.costs.calibrated |= {FULL.key, plan_key}
        out, seqs = _run(eng, reqs, RuntimeSettings(max_running=4))
    finally:
        eng.costs = eng_costs
    assert out == solo
    assert all(s.stats.load_plain_steps > 0 for s in seqs)
    assert sum(s.stats.drafted for s in seqs) == 0


def test_speculation_cap_pure_logic():
    costs = PassCosts()
    for rows in (1, 2, 4, 8, 16, 32, 64):
        costs.observe("full", rows, 0.040 + 0.0005 * rows)  # flat: weights stream, rows nearly free
        costs.observe("draft", rows, 0.012 + 0.0005 * rows)
    high = [SeqOutlook(0.9, 8, "draft") for _ in range(2)]
    assert speculation_cap(costs, "full", high) >= 3
    low = [SeqOutlook(0.05, 8, "draft") for _ in range(8)]
    assert speculation_cap(costs, "full", low) == 0
    lookup = [SeqOutlook(0.8, 6, None) for _ in range(4)]  # no draft pass: rows only
    assert speculation_cap(costs, "full", lookup) >= 4
    assert speculation_cap(PassCosts(), "full", high) is None
    assert expected_tokens(0.5, 0) == 1.0 and abs(expected_tokens(0.5, 2) - 1.75) < 1e-9
