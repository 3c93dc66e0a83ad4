"""A draft knob is declared once, in its DraftConfig field's `Knob` (engine.knobs): the search space
(`KNOBS`), the bench ablation, the CLI, validation against a model, the draft plan, the cost model and the
report follow it. A search space added to KNOBS (here `target_acceptance`, a field without one) shows up in
random proposals, TPE suggestions, the configs built from them, the ablation and `--draft`; a knob that
changes the pass (`exit_at`) is its declaration plus the pass code that reads it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated

import pytest
import torch
from pydantic import Field, ValidationError
from typer.testing import CliRunner

from engine.bench import ABLATION_CONFIGS, knob_ablation
from engine.config import KNOBS, DecodeStats, DraftConfig, KnobSpace, SamplingParams
from engine.knobs import CostPart, Knob, layer_count
from index.search import SearchSettings, params_to_config, random_params, search_domain, seed_list

NEW = KnobSpace("float", 0.6, 0.9, 0.1, alone=0.8, label="ta")


def test_default_search_space_is_the_one_searched_before_knobs():
    space = SearchSettings().space()
    assert list(space) == ["max_draft", "confidence", "quantize", "draft_vocab"]  # screened, no layer sets
    assert space["max_draft"].values() == tuple(range(2, 9))
    assert space["confidence"].values() == tuple(round(0.05 * i, 4) for i in range(19))
    assert space["quantize"].values() == ("none", "int8")
    assert space["draft_vocab"].values() == (0, 8192)


def test_knobs_only_narrow_the_table():
    assert SearchSettings(knobs={"quantize": ("int4",), "confidence": (0.3, 0.6)}).space()["confidence"].values() == (
        0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
    )  # fmt: skip
    for bad in ({"max_draft": (2, 20)}, {"quantize": ("fp8",)}, {"prompt_lookup": (2,)}, {"skip_mlp": (1,)}, {"nope": (1,)}):
        with pytest.raises(ValidationError):
            SearchSettings(knobs=bad)


def test_ablation_knobs_alone_are_the_hand_written_ones():
    base = dict(max_draft=4, confidence=0.6)
    assert knob_ablation() == {
        "skip-mlp4": DraftConfig(skip_mlp=(22, 24, 26, 27), **base),
        "skip-mlp4+vocab8k": DraftConfig(skip_mlp=(22, 24, 26, 27), draft_vocab=8192, **base),
        "skip-mlp4+adaptive": DraftConfig(skip_mlp=(22, 24, 26, 27), adaptive=True, **base),
        "int8": DraftConfig(quantize="int8", max_draft=6, confidence=0.3),
        "lookup": DraftConfig(prompt_lookup=3, model_draft=False, max_draft=8),
    }
    assert list(ABLATION_CONFIGS)[:5] == list(knob_ablation())


def test_a_new_knob_is_searched_ablated_and_settable(monkeypatch):
    monkeypatch.setitem(KNOBS, "target_acceptance", NEW)
    s = SearchSettings()
    assert s.space()["target_acceptance"] == NEW
    layers = list(range(1, 7))
    rng = random.Random(0)
    proposals = [random_params(rng, layers, s) for _ in range(40)]
    assert {p["target_acceptance"] for p in proposals} == set(NEW.values())
    assert {params_to_config(p, layers).target_acceptance for p in proposals} == set(NEW.values())
    assert all(p["target_acceptance"] == 0.7 for p in seed_list(layers, s, {}))  # the default, inside the space
    assert SearchSettings(knobs={"target_acceptance": (0.8, 0.8)}).space()["target_acceptance"].values() == (0.8,)
    assert knob_ablation()["skip-mlp4+ta"] == DraftConfig(skip_mlp=(22, 24, 26, 27), max_draft=4, confidence=0.6, target_acceptance=0.8)
    assert DraftConfig.from_options(["target_acceptance=0.8"]).target_acceptance == 0.8


def test_tpe_suggests_a_new_knob(monkeypatch):
    from test_index_search import SMALL, FakeClock, FakeEngine, _records

    monkeypatch.setitem(KNOBS, "target_acceptance", NEW)
    clock = FakeClock()
    res = search_domain(FakeEngine(clock), "math", _records(), SMALL.model_copy(update={"budget": 20}), progress=False, clock=clock)
    tpe = [c.config.target_acceptance for c in res.candidates if c.source == "tpe"]
    assert tpe and set(tpe) <= set(NEW.values())
    assert len({c.config.target_acceptance for c in res.candidates}) > 1


def test_from_options_takes_a_new_field():
    class WithDummy(DraftConfig):
        dummy: int = Field(0, ge=0, description="A knob added after the others.")

    c = WithDummy.from_options(["dummy=3", "skip-mlp=2,4-5", "quantize=int4"])
    assert (c.dummy, c.skip_mlp, c.quantize) == (3, (2, 4, 5), "int4")
    # a knob added later leaves ids alone at its default, with no list to update
    assert WithDummy(skip_mlp=(1,)).config_id == DraftConfig(skip_mlp=(1,)).config_id
    assert WithDummy(skip_mlp=(1,), dummy=2).config_id != DraftConfig(skip_mlp=(1,)).config_id


@dataclass
class _Out:
    text: str
    stats: DecodeStats


class _GenEngine:
    drafts: list[DraftConfig] = []
    precision = "native"

    @classmethod
    def load(cls, model, device="cpu", dtype="auto", precision="auto"):
        return cls()

    def encode_prompt(self, prompt=None, messages=None):
        return [1, 2]

    def stream(self, ids, params, draft):
        self.drafts.append(draft)
        yield _Out("hi", DecodeStats(new_tokens=1))


def test_generate_draft_option(monkeypatch):
    import typer

    import engine.generate
    from engine.cli import generate

    monkeypatch.setattr(engine.generate, "Engine", _GenEngine)
    _GenEngine.drafts = []
    app = typer.Typer()
    app.command()(generate)
    args = ["hello", "--skip-mlp", "20,22-23", "--max-draft", "5"]
    r = CliRunner().invoke(app, [*args, "--draft", "quantize=int8", "--draft", "prompt_lookup=2", "--draft", "max_draft=7"])
    assert r.exit_code == 0, r.output
    assert _GenEngine.drafts[-1] == DraftConfig(skip_mlp=(20, 22, 23), max_draft=7, quantize="int8", prompt_lookup=2)
    r = CliRunner().invoke(app, args)  # the named flags alone, as before --draft
    assert _GenEngine.drafts[-1] == DraftConfig(skip_mlp=(20, 22, 23), max_draft=5)  # confidence: the config default
    r = CliRunner().invoke(app, [*args, "--no-speculative"])
    assert _GenEngine.drafts[-1] == DraftConfig.plain()
    r = CliRunner().invoke(app, [*args, "--draft", "bogus=1"])
    assert r.exit_code != 0 and "KNOB=VALUE" in r.output


# ---- a knob that changes the draft pass, added by its declaration and the pass code alone ---------------

EXIT_AT = Knob(
    KnobSpace("layer"),  # its range is the model's: searched over the searchable layers
    limit=layer_count, reason="layers", problem="exits after layer {value} but the model has {num_layers} layers",
    plan=lambda v: {"exit_after": v},
    cost=lambda v, m, cm: CostPart(removed=m.num_layers - v if 0 < v < m.num_layers else 0.0),
    column="exit at", cell=lambda v, c: str(v or "-"),
)


def _exit_after_pass(self, plan):
    """The pass code that reads the new knob: the layers the pass runs (engine.lean's `_pass_layers`)."""
    return list(enumerate(self.layers[: plan.extra.get("exit_after") or plan.exit_layer or self.n_layers]))


@pytest.fixture
def exit_at_knob(monkeypatch):
    """What writing `exit_at: Annotated[int, EXIT_AT] = Field(0, ge=0, ...)` in DraftConfig's body (the
    declaration) and the line above in engine/lean.py (the pass) do; nothing else is edited."""
    from pydantic.fields import FieldInfo

    from engine.lean import LeanModel

    info = FieldInfo.from_annotated_attribute(Annotated[int, EXIT_AT], Field(0, ge=0, description="Draft exits after N layers."))
    monkeypatch.setitem(DraftConfig.__pydantic_fields__, "exit_at", info)
    DraftConfig.model_rebuild(force=True)
    monkeypatch.setitem(KNOBS, "exit_at", EXIT_AT.space)  # what import derives from the declaration
    monkeypatch.setattr(LeanModel, "_pass_layers", _exit_after_pass)
    yield
    monkeypatch.undo()
    DraftConfig.model_rebuild(force=True)
    assert "exit_at" not in DraftConfig.model_fields


def test_a_pass_changing_knob_is_its_declaration_and_the_pass(exit_at_knob):
    from test_index_search import SMALL, FakeClock, FakeEngine, _records

    from engine.draft import draft_plan
    from index.search import estimated_draft_cost
    from tests.tiny import tiny_engine

    cfg = DraftConfig(exit_at=2, max_draft=3, confidence=0.0)
    assert DraftConfig().config_id == DraftConfig(exit_at=0).config_id  # ids of existing configs unchanged
    assert cfg.config_id != DraftConfig(max_draft=3, confidence=0.0).config_id

    # validation against the model: the engine, the router's reload and the build all call this
    assert cfg.problems(4) == []
    assert DraftConfig(exit_at=9).problems(4) == [("layers", "exits after layer 9 but the model has 4 layers")]
    with pytest.raises(ValueError, match="exits after layer 9"):
        DraftConfig(exit_at=9).check(4)

    # the plan, and the pass that reads it: fewer layers, still lossless
    eng = tiny_engine()
    plan = draft_plan(eng.lean, cfg)
    assert plan.extra == {"exit_after": 2} and plan.key != draft_plan(eng.lean, DraftConfig()).key
    with pytest.raises(ValueError, match="exits after layer 9"):
        draft_plan(eng.lean, DraftConfig(exit_at=9))
    ids = eng.encode_prompt(prompt="abcabcabc")
    full = eng.lean.forward(torch.tensor(ids), 0, cache=eng.lean.new_cache(16))
    early = eng.lean.forward(torch.tensor(ids), 0, plan=plan, cache=eng.lean.new_cache(16))
    assert not torch.equal(early, full)
    params = SamplingParams(max_new_tokens=12)
    spec = eng.generate(ids, params, cfg)
    assert spec.token_ids == eng.generate(ids, params, DraftConfig.plain()).token_ids and spec.stats.drafted > 0

    # its share of the estimated draft cost
    s = SearchSettings()
    assert estimated_draft_cost(cfg, 4, s) < estimated_draft_cost(DraftConfig(), 4, s)

    # the report
    assert DraftConfig.report_columns()[-1] == "exit at" and cfg.report_cells()[-1] == "2"

    # the search: random proposals, seeds, TPE, and the configs built from them
    layers = list(range(1, 7))
    rng = random.Random(0)
    proposals = [random_params(rng, layers, s) for _ in range(40)]
    assert {p["exit_at"] for p in proposals} == {0, *layers}
    assert {params_to_config(p, layers).exit_at for p in proposals} == {0, *layers}
    assert all(p["exit_at"] == 0 for p in seed_list(layers, s, {}))
    clock = FakeClock()
    res = search_domain(FakeEngine(clock), "math", _records(), SMALL.model_copy(update={"budget": 20}), progress=False, clock=clock)
    tpe = [c.config.exit_at for c in res.candidates if c.source == "tpe"]
    assert tpe and set(tpe) <= set(range(8)) and len({c.config.exit_at for c in res.candidates}) > 1
