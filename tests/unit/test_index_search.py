"""Search logic on a small deterministic fake engine with a fake clock: no model, no timing noise."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from engine.config import DecodeStats, DraftConfig, SamplingParams
from index.corpus import Record
from index.search import SearchSettings, estimated_draft_cost, proxy_speedup, search_domain


@dataclass
class FakeResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: DecodeStats


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeEngine:
    """8 layers; skipping the MLPs of layers 3-5 costs little agreement, anything else costs a lot.

    A pass costs 1.0 time unit; a draft pass costs `draft_scale` x the share of sub-layers it runs.
    Generation time follows the expected-tokens-per-step formula, so speedups are exact, not noisy.
    """

    model_id = "fake"
    weights_hash = "f" * 64
    num_layers = 8

    def __init__(self, clock: FakeClock, draft_scale: float = 0.5):
        self.clock = clock
        self.draft_scale = draft_scale
        self.calls = {"generate": 0, "agreement": 0}

    def encode_prompt(self, prompt=None, messages=None):
        text = prompt if prompt is not None else " ".join(m["content"] for m in messages)
        return [ord(c) % 97 for c in text][:16] or [1]

    def _alpha(self, ids, draft: DraftConfig) -> float:
        cheap = {3: 0.01, 4: 0.02, 5: 0.01}
        cost = sum(cheap.get(i, 0.4) for i in draft.skip_mlp) + sum(0.3 for _ in draft.skip_attn)
        cost += 0.05 if draft.quantize == "int8" else 0.0
        cost += 0.02 if draft.draft_vocab else 0.0
        wobble = 0.01 * (sum(ids) % 3)
        return max(0.0, min(1.0, math.exp(-cost) - wobble))

    def _cost(self, draft: DraftConfig) -> float:
        kept = 2 * self.num_layers - len(draft.skip_attn) - len(draft.skip_mlp)
        int8 = 0.6 if draft.quantize == "int8" else 1.0
        return self.draft_scale * int8 * kept / (2 * self.num_layers)

    def generate(self, ids, params: SamplingParams, draft: DraftConfig):
        self.calls["generate"] += 1
        n = params.max_new_tokens
        toks = [(sum(ids) + 7 * i) % 50 for i in range(n)]
        st = DecodeStats(prompt_tokens=len(ids), new_tokens=n, finish_reason="length")
        if not draft.enabled:
            st.steps = n - 1
            st.time_verify = float(n - 1)
        else:
            a, g = self._alpha(ids, draft), draft.max_draft
            per_step = g + 1.0 if a >= 1 else (1 - a ** (g + 1)) / (1 - a)
            st.steps = max(1, round((n - 1) / per_step))
            st.drafted = st.steps * g
            st.accepted = min(st.drafted, round(st.steps * (per_step - 1)))
            st.time_draft = st.drafted * self._cost(draft)
            st.time_verify = float(st.steps)
        st.time_prefill = 1.0
        self.clock.t += st.time_prefill + st.time_draft + st.time_verify
        return FakeResult(toks, "", "length", st)

    def draft_agreement(self, ids, continuation_ids, draft: DraftConfig) -> float:
        self.calls["agreement"] += 1
        return self._alpha(ids, draft)


def _records(n: int = 6) -> list[Record]:
    return [Record(domain="math", prompt=f"What is {i} plus {i * 3}?") for i in range(n)]


SMALL = SearchSettings(budget=12, screen_prompts=2, measure_prompts=2, n_measure=2, max_new_tokens=24, screen_tokens=8, layer_profile_prompts=1)


def _run(settings: SearchSettings = SMALL, draft_scale: float = 0.5):
    clock = FakeClock()
    eng = FakeEngine(clock, draft_scale=draft_scale)
    return search_domain(eng, "math", _records(), settings, progress=False, clock=clock), eng


def test_search_finds_a_faster_config():
    res, eng = _run()
    assert res.config.enabled
    assert res.speedup >= SMALL.min_speedup
    assert 0 < res.acceptance <= 1 and res.mean_accepted_tokens > 1
    assert len(res.candidates) == SMALL.budget
    assert len(res.measured) == SMALL.n_measure + 1  # plus the best one with prompt lookup
    assert res.measured[-1].config.prompt_lookup == SMALL.prompt_lookup_variant
    assert {c.config.quantize for c in res.candidates} == {"none", "int8"}
    assert {c.config.draft_vocab for c in res.candidates} == {0, 8192}
    assert len(res.layer_agreement) == FakeEngine.num_layers
    # the chosen config is the best measured one
    assert res.speedup == max(m.speedup for m in res.measured)
    # protected layers are never skipped
    for c in res.candidates:
        assert 0 not in c.config.skip_attn + c.config.skip_mlp
        assert 7 not in c.config.skip_attn + c.config.skip_mlp
    assert {c.source for c in res.candidates} >= {"seed", "random", "tpe"}
    # the draft-cost calibration recovers the fake's cost scale (0.5 over the cost model's 1.0)
    assert 0.3 < res.draft_cost_scale < 0.8
    assert set(res.draft_cost_scales) == {"none", "int8"}


def test_search_is_reproducible_with_a_seed():
    a, _ = _run()
    b, _ = _run()
    assert [c.config for c in a.candidates] == [c.config for c in b.candidates]
    assert a.config == b.config and a.speedup == b.speedup
    c, _ = _run(SMALL.model_copy(update={"seed": 7}))
    assert [x.config for x in c.candidates] != [x.config for x in a.candidates]


def test_plain_chosen_when_nothing_beats_it():
    res, _ = _run(draft_scale=6.0)  # drafts cost more than verifying: speculation can only lose
    assert res.config == DraftConfig.plain()
    assert res.speedup == 1.0 and res.acceptance == 0.0 and res.mean_accepted_tokens == 1.0
    assert res.measured and all(m.speedup < 1.0 for m in res.measured)


def test_min_speedup_gate():
    res, _ = _run(SMALL.model_copy(update={"min_speedup": 100.0}))
    assert res.config == DraftConfig.plain()


def test_proxy_and_cost_model():
    s = SearchSettings()
    assert proxy_speedup(0.0, 4, 0.5, 0.0) == pytest.approx(1 / 3)
    assert proxy_speedup(1.0, 4, 0.0, 0.0) == pytest.approx(5.0)
    assert proxy_speedup(0.8, 4, 0.2, 0.0) > proxy_speedup(0.5, 4, 0.2, 0.0)
    full = estimated_draft_cost(DraftConfig(), 10, s)
    assert full == pytest.approx(1.0)
    assert estimated_draft_cost(DraftConfig(skip_mlp=(1, 2)), 10, s) < estimated_draft_cost(DraftConfig(skip_attn=(1,)), 10, s) < full


def test_one_expected_tokens_model():
    """Screening's proxy and the load-aware cap count expected tokens with one formula and one clamp."""
    from engine.costs import expected_tokens

    for alpha in (-0.5, 0.0, 0.3, 0.7, 0.999, 1.0, 1.5):
        for gamma in (1, 4, 8):
            assert proxy_speedup(alpha, gamma, 0.0, 0.0) == expected_tokens(alpha, gamma)
    assert expected_tokens(1.0, 4) == 5.0 == expected_tokens(2.0, 4) and expected_tokens(-1.0, 4) == 1.0


def test_empty_domain_rejected():
    with pytest.raises(ValueError, match="no prompts"):
        search_domain(FakeEngine(FakeClock()), "x", [], SMALL, progress=False)


class NoisyEngine(FakeEngine):
    """Plain runs are stalled 5x (another process stole the CPU) in every measurement round but one."""

    def __init__(self, clock, **kw):
        super().__init__(clock, **kw)
        self.plain_runs = 0

    def generate(self, ids, params, draft):
        t0 = self.clock.t
        res = super().generate(ids, params, draft)
        if not draft.enabled and params.max_new_tokens == SMALL.max_new_tokens:
            self.plain_runs += 1
            if self.plain_runs not in (3, 4):  # 2 prompts x 3 rounds: only round 2 runs undisturbed
                self.clock.t += 4 * (self.clock.t - t0)
        return res


def test_fastest_round_counts():
    clock = FakeClock()
    quiet, _ = _run()
    noisy = search_domain(NoisyEngine(clock), "math", _records(), SMALL, progress=False, clock=clock)
    assert noisy.speedup == pytest.approx(quiet.speedup)


class LyingEngine(FakeEngine):
    """Speculative runs are fast, but the stats say one token per verify pass: a disturbed timing."""

    def generate(self, ids, params, draft):
        res = super().generate(ids, params, draft)
        if draft.enabled:
            res.stats.steps = res.stats.new_tokens - 1
        return res


def test_implausible_speedup_disqualified():
    clock = FakeClock()
    res = search_domain(LyingEngine(clock), "math", _records(), SMALL, progress=False, clock=clock)
    assert res.measured and not any(m.plausible for m in res.measured)
    assert res.config == DraftConfig.plain()
