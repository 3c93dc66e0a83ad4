"""A tiny-budget index build on the real engine and the real MiniLM embedder (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.config import DraftConfig
from index import artefact as A
from index.build import BuildSettings, EngineIdentity, build
from index.search import DomainResult

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine():
    import torch

    torch.set_num_threads(1)
    from engine.generate import Engine

    return Engine.load("smollm2")


def _small_corpus(dst: Path, domains=("math", "translate"), n: int = 6) -> Path:
    dst.mkdir(parents=True)
    for d in domains:
        lines = (REPO / "index/data/default" / f"{d}.jsonl").read_text().splitlines()[:n]
        (dst / f"{d}.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def test_tiny_budget_build_on_the_real_model(tmp_path, engine):
    s = BuildSettings(
        data=_small_corpus(tmp_path / "data"),
        out=tmp_path / "out",
        k=2,
        budget=3,
        screen_prompts=1,
        measure_prompts=1,
        n_measure=1,
        max_new_tokens=12,
        layer_profile_prompts=1,
        progress=False,
        # The search alone (the procedure before issue 11): each domain gets its best measured config, or
        # plain when none reached min_speedup. The default procedure (a general config) is tested below.
        general=False,
    )
    r = build(s, engine=engine)
    art = A.load_artefact(s.out, expect_model_hash=engine.weights_hash, expect_embedder_id="minilm:all-MiniLM-L6-v2")
    m = art.manifest
    assert m.model_id == engine.model_id and m.embedder_dim == 384 and art.index.ntotal == 4
    assert set(m.domains) == {"math", "translate"}
    for name, e in m.domains.items():
        e.config.check(engine.num_layers)
        assert e.speedup > 0 and e.n_prompts == 6 and e.n_centroids == 2
        if e.config.enabled:  # a chosen config must have beaten plain when measured
            assert e.speedup >= 1.03
        else:
            assert e.config == DraftConfig.plain() and e.speedup == 1.0
        res = r.results[name]
        assert len(res.candidates) == 3 and len(res.layer_agreement) == engine.num_layers
        assert all(mm.lossless for mm in res.measured)  # greedy speculation is token-identical to plain
    report = json.loads((art.path / "search.json").read_text())
    assert set(report["domains"]) == {"math", "translate"}
    assert (art.path / "search.png").stat().st_size > 1000
    with pytest.raises(A.ArtefactError, match="weights hash"):
        A.load_artefact(s.out, expect_model_hash="0" * 64)


def test_general_procedure_on_the_real_model(tmp_path, engine):
    """The default procedure: a general config measured on both domains' prompts becomes the fallback; a
    domain keeps its own config only when it beat the general one by more than the noise; nothing is
    plain unless plain measurably won; speedups are recorded with their intervals."""
    from index.select import GENERAL_CANDIDATES

    cands = {n: GENERAL_CANDIDATES[n] for n in ("lookup2+adaptive", "int8+vocab8k+lookup2+adaptive")}
    s = BuildSettings(
        data=_small_corpus(tmp_path / "data", n=4), out=tmp_path / "out", k=1, budget=2, screen_prompts=1, measure_prompts=1,
        measure_rounds=1, n_measure=1, max_new_tokens=12, layer_profile_prompts=0, progress=False,
        general_candidates=cands, general_prompts=1, confirm_prompts=2, select_rounds=1, select_tokens=16,
    )  # fmt: skip
    r = build(s, engine=engine)
    m = A.load_artefact(s.out).manifest
    g = r.general.choice
    assert m.general is not None and set(m.general.candidates) == set(cands) and m.general.speedup.prompts == 2
    assert all(c.lossless for c in g.candidates)
    if m.general.name == "plain":
        assert max(c.speedup.high for c in g.candidates if c.valid) < 1.0
    else:
        assert m.fallback_config == cands[m.general.name] and m.general.speedup.value == max(c.speedup.value for c in g.candidates if c.valid)
    for name, e in m.domains.items():
        ch = r.results[name].choice
        assert e.source == ch.source and e.measured == ch.speedup and e.measured.prompts == 2 and e.speedup == e.measured.value
        assert e.measured.low <= e.measured.value <= e.measured.high
        if e.source == "own" and e.config != m.fallback_config:
            assert e.vs_general.low > 1.0
        else:
            assert e.config == m.fallback_config
        if not e.config.enabled and m.fallback_config.enabled:  # plain only when it measurably beat the general config
            assert e.vs_general.low > 1.0
        assert all(mm.lossless for mm in r.results[name].measured)


def test_llm_hidden_representation(tmp_path, engine):
    def runner(domains, search, settings):
        res = {n: DomainResult(name=n, config=DraftConfig.plain(), speedup=1.0, acceptance=0.0, mean_accepted_tokens=1.0) for n in domains}
        return EngineIdentity.of(engine), res

    s = BuildSettings(data=_small_corpus(tmp_path / "data", n=4), out=tmp_path / "out", k=1, representation="llm-hidden", progress=False)
    build(s, runner=runner, engine=engine)
    art = A.load_artefact(s.out)
    assert art.manifest.representation == "llm-hidden"
    assert art.manifest.embedder_id.startswith(f"llm-hidden:{engine.model_id}:")
    assert art.index.d == art.manifest.embedder_dim == engine.embed_hidden(engine.encode_prompt(prompt="hi")).shape[0]
    x = np.zeros((1, art.index.d), np.float32)
    art.index.reconstruct_n(0, 1, x)
    assert abs(float(np.linalg.norm(x)) - 1.0) < 1e-4
