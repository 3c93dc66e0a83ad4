"""Offline routing for the bench (`--routed`): routed / general / oracle configs per prompt, routes counted."""

from __future__ import annotations

from engine.config import DraftConfig
from engine.prompts import BenchPrompt
from router.config import RouterConfig
from router.offline import GENERAL, ORACLE, ROUTED, routed_methods
from router.reload import StaticSource
from router.route import Router
from tests.unit.test_router_logic import CODE, FALLBACK, MATH, FakeEmbedder, fake_artefact


def test_routed_general_and_oracle_per_prompt():
    art = fake_artefact()
    router = Router(FakeEmbedder(), StaticSource(art), config=RouterConfig(redis_url=None))
    prompts = [
        BenchPrompt("code-edit", prompt="code fix this", domain="code"),
        BenchPrompt("math", prompt="math 1+1"),
        BenchPrompt("rag", prompt="far away passage"),  # far from every centroid
        BenchPrompt("pets", messages=({"role": "user", "content": "math about cats"},)),
    ]
    r = routed_methods(art, prompts, router=router)
    assert r.methods[ROUTED] == [CODE, MATH, FALLBACK, MATH]
    assert r.methods[GENERAL] == [FALLBACK] * 4
    # oracle: a prompt's domain field, else its kind; kinds without an index domain get the general config
    assert r.methods[ORACLE] == [CODE, MATH, FALLBACK, FALLBACK]
    assert r.oracle_domains == {"code-edit": "code", "math": "math", "rag": GENERAL, "pets": GENERAL}
    assert r.route_domains() == {"fallback": 1, "code": 1, "math": 2}
    assert r.route_table(prompts)["rag"] == {"fallback": 1}
    rep = r.report(prompts)
    assert rep["route_domains"]["fallback"] == 1 and len(rep["decisions"]) == 4 and rep["decisions"][2]["fallback"]


def test_no_oracle_when_no_kind_names_a_domain():
    art = fake_artefact()
    router = Router(FakeEmbedder(), StaticSource(art), config=RouterConfig(redis_url=None))
    r = routed_methods(art, [BenchPrompt("custom", prompt="code x")], router=router)
    assert set(r.methods) == {ROUTED, GENERAL} and r.route_domains() == {"fallback": 0, "code": 1}
    assert DraftConfig.plain() == r.methods[GENERAL][0]
