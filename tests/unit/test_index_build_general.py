"""A build whose runner measured a general config: it becomes the fallback, and each domain records where
its config came from and its measured speedup with an interval. Also the search's own-vs-general stage
on the fake engine, and the summary table showing every knob."""

from __future__ import annotations

import json
import logging

from rich.console import Console

from engine.config import DraftConfig
from index import artefact as A
from index.build import BuildSettings, EngineIdentity, GeneralResult, build, manifest_table, summary_table
from index.search import DomainResult, search_domain
from index.select import GENERAL_CANDIDATES, ConfigTiming, Measurement, SelectSettings, choose_domain, choose_general
from tests.unit.test_index_build import BowEmbedder, _corpus
from tests.unit.test_index_search import SMALL, FakeClock, FakeEngine, _records

GEN = GENERAL_CANDIDATES["lookup"]
OWN = DraftConfig(skip_mlp=(2,), max_draft=3)


def _timing(cfg, secs):
    return ConfigTiming(config=cfg, seconds=secs, tokens=[8] * len(secs), steps=4 * len(secs), decoded=12 * len(secs), drafted=8, accepted=6)


def _general() -> GeneralResult:
    plain = [1.0, 2.0, 1.5, 1.2]
    m = Measurement(
        prompts=["a:1", "b:1", "c:1", "d:1"],
        configs={"plain": _timing(DraftConfig.plain(), plain), "lookup": _timing(GEN, [p * 0.8 for p in plain])},
    )
    return GeneralResult(choice=choose_general(m, SelectSettings(n_boot=200)), measurement=m)


def general_runner(domains, search, settings):
    gen = _general()
    res = {}
    for i, name in enumerate(sorted(domains)):
        own = OWN if i == 0 else GEN
        plain = [1.0, 1.1, 0.9]
        factor = 0.6 if i == 0 else 0.8
        m = Measurement(
            prompts=["x", "y", "z"],
            configs={
                "plain": _timing(DraftConfig.plain(), plain),
                "general": _timing(GEN, [p * 0.8 for p in plain]),
                **({"own": _timing(OWN, [p * factor for p in plain])} if own != GEN else {}),
            },
        )
        ch = choose_domain(m, own, GEN, SelectSettings(n_boot=200))
        res[name] = DomainResult(
            name=name, config=ch.config, speedup=ch.speedup.value, acceptance=ch.acceptance, mean_accepted_tokens=ch.tokens_per_step,
            choice=ch, confirmation=m,
        )  # fmt: skip
    return EngineIdentity("fake", "f" * 64, 8), res, gen


def test_general_config_becomes_the_fallback_and_domains_record_their_choice(tmp_path):
    s = BuildSettings(data=_corpus(tmp_path / "data"), out=tmp_path / "out", k=2, progress=False)
    r = build(s, runner=general_runner, embedder=BowEmbedder())
    m = A.load_artefact(s.out).manifest
    assert m.fallback_config == GEN and m.general is not None and m.general.name == "lookup"
    assert m.general.speedup.value == 1.25 and set(m.general.candidates) == {"lookup"}
    chat, code = m.domains["chat"], m.domains["code"]  # chat: own config clearly faster; code: own is the general one
    assert chat.source == "own" and chat.config == OWN and chat.vs_general.low > 1.0 and chat.measured.value > 1.6
    assert code.source == "general" and code.config == GEN and code.vs_general is None and code.measured.value == 1.25
    report = json.loads((r.path / "search.json").read_text())
    assert report["general"]["choice"]["name"] == "lookup" and len(report["general"]["measurement"]["prompts"]) == 4
    text = _render(summary_table(r))
    for knob in ("quant", "vocab", "lookup", "model", "adaptive", "(general)", "own", "1.25x [1.25, 1.25]"):
        assert knob in text


def test_older_manifests_still_load_and_render(tmp_path):
    from tests.unit.test_index_artefact import LABELS, _index, _manifest

    old = _manifest()
    assert old.general is None and all(e.source is None and e.measured is None for e in old.domains.values())
    A.write_artefact(tmp_path, old, _index(), LABELS)
    art = A.load_artefact(tmp_path)
    assert art.manifest.fallback_config == DraftConfig.plain()
    assert "none (older build)" in _render(manifest_table(art.manifest))


def _render(table) -> str:
    c = Console(width=300, record=True)
    c.print(table)
    return c.export_text()


def test_search_compares_its_best_config_with_the_general_one(caplog):
    clock = FakeClock()
    eng = FakeEngine(clock)
    sel = SelectSettings(confirm_prompts=3, rounds=1, max_new_tokens=16, n_boot=200)
    extra = {"a": GENERAL_CANDIDATES["int8+vocab8k+lookup"], "b": GEN}
    with caplog.at_level(logging.INFO, logger="index.search"):
        res = search_domain(eng, "math", _records(8), SMALL, progress=False, clock=clock, extra=extra, general=GEN, select=sel)
    measured = {m.config for m in res.measured}
    assert set(extra.values()) <= measured  # the general candidates compete for the domain's own config
    ch = res.choice
    assert ch is not None and res.config == ch.config and res.speedup == ch.speedup.value
    assert ch.own_config == max((m for m in res.measured if m.lossless and m.plausible), key=lambda m: (m.speedup, m.config.config_id)).config
    assert len(res.confirmation.prompts) == 3 and set(res.confirmation.configs) >= {"plain", "general"}
    if ch.source == "own":
        assert ch.own_vs_general.low > 1.0
    # without bars the search still says where it is
    assert any("own vs general" in r.getMessage() for r in caplog.records)
    assert any("continuations" in r.getMessage() or "screening" in r.getMessage() for r in caplog.records)
