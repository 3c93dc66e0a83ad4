"""The general config and the per-domain keep-or-inherit choice, on fake timings (no model, no noise)."""

from __future__ import annotations

import math

import pytest

from engine.config import DecodeStats, DraftConfig
from index.select import (
    GENERAL, GENERAL_CANDIDATES, OWN, PLAIN, ConfigTiming, Measurement, SelectSettings, choose_domain, choose_general,
    domain_configs, general_prompts, measure, ratio_ci,
)  # fmt: skip

S = SelectSettings(n_boot=500)
A = GENERAL_CANDIDATES["int8+vocab8k+lookup2+adaptive"]
B = GENERAL_CANDIDATES["lookup"]
OWN_CFG = DraftConfig(quantize="int8", max_draft=6, confidence=0.3)


def _timing(cfg: DraftConfig, seconds: list[float], lossless: bool = True, tokens_per_step: float = 4.0) -> ConfigTiming:
    n = len(seconds)
    steps = 10 * n if cfg.enabled else 31 * n
    decoded = round(steps * tokens_per_step) if cfg.enabled else 31 * n
    return ConfigTiming(config=cfg, seconds=seconds, tokens=[32] * n, lossless=lossless, steps=steps, decoded=decoded, drafted=steps * 4, accepted=steps * 3)


def _m(**timings: ConfigTiming) -> Measurement:
    n = len(next(iter(timings.values())).seconds)
    return Measurement(prompts=[f"p{i}" for i in range(n)], configs=timings)


PLAIN_S = [1.0, 2.0, 1.5, 3.0, 2.5, 1.2, 0.8, 2.2]


def _scaled(factors: list[float] | float) -> list[float]:
    f = factors if isinstance(factors, list) else [factors] * len(PLAIN_S)
    return [p * x for p, x in zip(PLAIN_S, f)]


def test_ratio_ci_is_a_paired_geometric_mean():
    r = ratio_ci([2.0, 4.0, 8.0], [1.0, 2.0, 4.0])
    assert r.value == r.low == r.high == 2.0 and r.prompts == 3
    r = ratio_ci([1.0, 4.0], [1.0, 1.0])
    assert math.isclose(r.value, 2.0) and r.low <= r.value <= r.high and r.low == 1.0 and r.high == 4.0
    one = ratio_ci([3.0], [2.0])
    assert one.low == one.value == one.high == 1.5
    with pytest.raises(ValueError):
        ratio_ci([], [])


def test_general_is_the_best_candidate_by_geometric_mean():
    m = _m(plain=_timing(DraftConfig.plain(), PLAIN_S), a=_timing(A, _scaled(0.7)), b=_timing(B, _scaled(0.8)))
    g = choose_general(m, S)
    assert g.name == "a" and g.config == A and math.isclose(g.speedup.value, 1 / 0.7, rel_tol=1e-3)
    assert {c.name for c in g.candidates} == {"a", "b"}


def test_fallback_is_not_plain_when_plain_did_not_measurably_win():
    # the best candidate is a little slower than plain on average, but not on every prompt: a tie
    noisy = [1.1, 0.95, 1.08, 0.97, 1.05, 0.99, 1.06, 0.98]
    m = _m(plain=_timing(DraftConfig.plain(), PLAIN_S), a=_timing(A, _scaled(noisy)), b=_timing(B, _scaled(1.2)))
    g = choose_general(m, S)
    assert g.speedup.low < 1.0 < g.speedup.high
    assert g.name == "a" and g.config.enabled


def test_fallback_is_plain_only_when_plain_measurably_won():
    m = _m(plain=_timing(DraftConfig.plain(), PLAIN_S), a=_timing(A, _scaled(1.1)), b=_timing(B, _scaled(1.2)))
    g = choose_general(m, S)
    assert g.name == PLAIN and g.config == DraftConfig.plain() and "plain measurably won" in g.reason


def test_a_lossy_or_implausible_candidate_never_wins():
    m = _m(
        plain=_timing(DraftConfig.plain(), PLAIN_S),
        a=_timing(A, _scaled(0.3), lossless=False),  # fastest, but changed the output
        b=_timing(B, _scaled(0.2), tokens_per_step=2.0),  # 5x with 2 tokens per verify pass: impossible
        c=_timing(OWN_CFG, _scaled(0.9)),
    )
    g = choose_general(m, S)
    assert g.name == "c"
    bad = {c.name: c for c in g.candidates}
    assert not bad["a"].valid and not bad["b"].plausible
    # nothing valid at all: plain
    m2 = _m(plain=_timing(DraftConfig.plain(), PLAIN_S), a=_timing(A, _scaled(0.3), lossless=False))
    assert choose_general(m2, S).config == DraftConfig.plain()


def test_domain_keeps_its_own_config_only_when_its_interval_clears_the_general_one():
    base = dict(plain=_timing(DraftConfig.plain(), PLAIN_S), general=_timing(A, _scaled(0.8)))
    clear = choose_domain(_m(**base, own=_timing(OWN_CFG, _scaled(0.7))), OWN_CFG, A, S)
    assert clear.source == "own" and clear.config == OWN_CFG
    assert clear.own_vs_general.low > 1.0 and math.isclose(clear.speedup.value, 1 / 0.7, rel_tol=1e-3)

    # faster on average (geometric mean > 1) but not on every prompt: within the noise, inherit
    mixed = [0.6, 0.9, 0.65, 0.88, 0.62, 0.95, 0.7, 0.9]
    noisy = choose_domain(_m(**base, own=_timing(OWN_CFG, _scaled(mixed))), OWN_CFG, A, S)
    assert noisy.own_vs_general.value > 1.0 and noisy.own_vs_general.low <= 1.0
    assert noisy.source == "general" and noisy.config == A and math.isclose(noisy.speedup.value, 1 / 0.8, rel_tol=1e-3)

    lossy = choose_domain(_m(**base, own=_timing(OWN_CFG, _scaled(0.5), lossless=False)), OWN_CFG, A, S)
    assert lossy.source == "general"

    same = choose_domain(_m(**base), A, A, S)
    assert same.source == "general" and same.own_vs_general is None


def test_plain_wins_a_domain_only_by_measurably_beating_the_general_config():
    assert set(domain_configs(DraftConfig.plain(), A)) == {GENERAL}
    slower = _m(plain=_timing(DraftConfig.plain(), PLAIN_S), general=_timing(A, _scaled(1.15)))
    c = choose_domain(slower, DraftConfig.plain(), A, S)
    assert c.source == "own" and c.config == DraftConfig.plain() and c.speedup.value == 1.0
    tie = _m(plain=_timing(DraftConfig.plain(), PLAIN_S), general=_timing(A, _scaled([1.1, 0.95, 1.08, 0.97, 1.05, 0.99, 1.06, 0.98])))
    c = choose_domain(tie, DraftConfig.plain(), A, S)
    assert c.source == "general" and c.config == A


def test_general_plain_is_handled():
    assert set(domain_configs(OWN_CFG, DraftConfig.plain())) == {OWN}
    m = _m(plain=_timing(DraftConfig.plain(), PLAIN_S), own=_timing(OWN_CFG, _scaled(0.8)))
    c = choose_domain(m, OWN_CFG, DraftConfig.plain(), S)
    assert c.source == "own" and c.general_speedup.value == 1.0


class _Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


class _Result:
    def __init__(self, toks, st):
        self.token_ids, self.stats = toks, st


class _Engine:
    """A draft costs `cost[config]` per token; the first run of each (config, prompt) is slowed down
    (a disturbed round) and one config changes the output."""

    def __init__(self, clock, cost, lossy=None):
        self.clock, self.cost, self.lossy, self.seen, self.order = clock, cost, lossy, set(), []

    def encode_prompt(self, prompt=None, messages=None):
        return [len(prompt or "")]

    def generate(self, ids, params, draft):
        key = (draft.config_id, ids[0])
        self.order.append(draft.config_id)
        self.clock.t += self.cost[draft.config_id] * ids[0] * (3.0 if key not in self.seen else 1.0)
        self.seen.add(key)
        toks = [1, 2, 3] if draft.config_id != self.lossy else [1, 2, 4]
        return _Result(toks, DecodeStats(new_tokens=3, steps=1 if draft.enabled else 2, drafted=2, accepted=2))


def test_measure_interleaves_keeps_the_fastest_round_and_checks_output():
    clock = _Clock()
    eng = _Engine(clock, {"plain": 1.0, A.config_id: 0.5, B.config_id: 0.25}, lossy=B.config_id)
    m = measure(eng, [[2], [4]], {"a": A, "b": B}, SelectSettings(rounds=2), clock=clock)
    assert list(m.configs) == [PLAIN, "a", "b"]
    assert m.configs[PLAIN].seconds == [2.0, 4.0] and m.configs["a"].seconds == [1.0, 2.0]
    assert m.configs["a"].lossless and not m.configs["b"].lossless
    assert eng.order[:3] == ["plain", A.config_id, B.config_id] and eng.order[3:6] == [A.config_id, B.config_id, "plain"]
    both = m.merge(m)
    assert both.configs["a"].seconds == [1.0, 2.0, 1.0, 2.0] and len(both.prompts) == 4
    with pytest.raises(ValueError):
        measure(eng, [[2]], {PLAIN: A}, S, clock=clock)


def test_general_prompts_take_each_domain_alike():
    class R:
        def __init__(self, i):
            self.prompt, self.source = f"p{i}", f"f:{i}"

        def messages_list(self):
            return None

    items = general_prompts({"b": [R(i) for i in range(5)], "a": [R(i) for i in range(2)]}, SelectSettings(general_prompts=3))
    labels = [label for label, _ in items]
    assert sum(x.startswith("a:") for x in labels) == 2 and sum(x.startswith("b:") for x in labels) == 3
    assert labels[0].startswith("a:") and labels[1].startswith("b:")  # round-robin over sorted domains
    again = general_prompts({"b": [R(i) for i in range(5)], "a": [R(i) for i in range(2)]}, SelectSettings(general_prompts=3))
    assert [label for label, _ in again] == labels  # seeded: the same prompts every build


def test_general_candidates_are_in_the_bench_ablation_set():
    from engine.bench import ABLATION_CONFIGS

    for name, cfg in GENERAL_CANDIDATES.items():
        assert ABLATION_CONFIGS[name] == cfg
    assert all(f.description for f in SelectSettings.model_fields.values())
