"""The shipped default artefact loads, verifies, and was built from the shipped default corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from index import artefact as A
from index.corpus import load_corpus
from index.embed import MINILM_ID

REPO = Path(__file__).resolve().parents[2]


def test_default_artefact_is_current_and_valid():
    art = A.load_artefact(A.DEFAULT_ROOT, expect_embedder_id=MINILM_ID)
    m = art.manifest
    corpus = load_corpus(REPO / "index/data/default")
    assert set(m.domains) == set(corpus.domains)
    assert m.corpus_hash == corpus.hash, "index/data/default changed: rebuild with `knnssd index build` (see README)"
    assert m.model_id == "smollm2" and m.representation == "minilm" and m.embedder_dim == 384
    for e in m.domains.values():
        assert e.n_prompts == len(corpus.domains[e.name])
        # never measurably slower than plain: a domain measured a win, got plain, or inherited a general config
        # whose interval against plain on its prompts reaches 1 (index.select keeps plain out unless it wins)
        assert e.speedup >= 1.0 or (e.measured is not None and e.measured.high >= 1.0), e
    assert {"search.json", "search.png"} <= set(m.files)


@pytest.mark.slow
def test_default_artefact_matches_the_bundled_model():
    from engine.load import load_model

    loaded = load_model("smollm2")
    A.load_artefact(A.DEFAULT_ROOT, expect_model_hash=loaded.weights_hash)
