"""Plain decoding is decided in one place (`engine.plain.plain_reason`); the request path asks it."""

from __future__ import annotations

from engine.config import DraftConfig, SamplingParams
from engine.decode import Sequence
from engine.draft import draft_plan
from engine.plain import CONFIG, LOAD, REQUEST, plain_reason
from tests.tiny import tiny_engine

SPEC = DraftConfig(skip_mlp=(1,), max_draft=3)


def test_the_reasons_in_order():
    assert plain_reason(speculative=False) == REQUEST  # before routing: not routed at all
    assert plain_reason(SPEC, speculative=False) == REQUEST
    assert plain_reason() is None  # speculative, config not known yet: route it
    assert plain_reason(DraftConfig.plain()) == CONFIG  # the route (or its fallback, or a failed route) is plain
    assert plain_reason(DraftConfig.plain(), cap=0) == CONFIG
    assert plain_reason(SPEC, cap=0) == LOAD
    assert plain_reason(SPEC, cap=2) is None and plain_reason(SPEC) is None
    # lookup alone is not plain: lookup may still draft (no model pass, though)
    assert plain_reason(DraftConfig(prompt_lookup=2, model_draft=False)) is None


def test_the_engine_asks_it():
    eng = tiny_engine()
    params = SamplingParams(max_new_tokens=4)
    plain = Sequence(eng.lean, [2, 3, 4], params, DraftConfig.plain(), frozenset({1}))
    assert plain.drafter is None and plain.draft_limit() == 0
    spec = Sequence(eng.lean, [2, 3, 4], params, SPEC, frozenset({1}))
    assert spec.drafter is not None and spec.drafter.plan is not None
    assert draft_plan(eng.lean, DraftConfig.plain()) is None
    assert draft_plan(eng.lean, DraftConfig(prompt_lookup=2, model_draft=False)) is None
