"""Centroids: k-means and lookup on synthetic data, and held-out prompts routed to their own domain
with the real bundled MiniLM embedder on the shipped corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.centroids import build_index, kmeans, lookup, nearest_domain, similarity_threshold
from index.embed import l2_normalise

REPO = Path(__file__).resolve().parents[2]


def _blobs(seed: int = 0, d: int = 16, n: int = 30):
    rng = np.random.default_rng(seed)
    centres = {name: l2_normalise(rng.standard_normal(d)) for name in ("a", "b", "c")}
    return {name: l2_normalise(c + 0.15 * rng.standard_normal((n, d))) for name, c in centres.items()}, centres


def test_kmeans_shapes_and_clamping():
    x = _blobs()[0]["a"]
    assert kmeans(x, 1).shape == (1, 16)
    assert kmeans(x, 3, seed=1).shape == (3, 16)
    assert kmeans(x[:2], 5).shape == (2, 16)  # k clamped to the number of prompts
    c = kmeans(x, 3, seed=1)
    assert np.allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    assert np.allclose(c, kmeans(x, 3, seed=1))  # seeded


def test_index_and_lookup():
    vecs, centres = _blobs()
    index, labels = build_index(vecs, k=2, seed=0)
    assert index.ntotal == 6 and labels == ["a", "a", "b", "b", "c", "c"]
    q = np.stack([centres["b"], centres["c"]])
    assert [d for d, _ in nearest_domain(index, labels, q)] == ["b", "c"]
    ms = lookup(index, labels, q, k=3)
    assert len(ms[0]) == 3 and ms[0][0].score >= ms[0][1].score >= ms[0][2].score
    assert lookup(index, labels, q, k=99)[0][-1].row >= 0  # k clamped to ntotal
    t = similarity_threshold(index, labels, vecs, 0.0, 0.05)
    assert 0 < t < min(s for v in vecs.values() for _, s in nearest_domain(index, labels, v))


def test_dimension_mismatch_rejected():
    with pytest.raises(ValueError, match="dimensions"):
        build_index({"a": np.ones((2, 4), np.float32), "b": np.ones((2, 5), np.float32)}, k=1)


@pytest.fixture(scope="module")
def minilm():
    import torch

    torch.set_num_threads(1)
    from index.embed import MiniLMEmbedder

    return MiniLMEmbedder(progress=False)


def test_minilm_embedder_contract(minilm):
    from index.embed import MINILM_ID, Embedder

    assert isinstance(minilm, Embedder)
    assert minilm.id == MINILM_ID and minilm.dim == 384
    v = minilm.embed(["Solve 3x + 2 = 11.", "Translate 'good morning' into French."])
    assert v.shape == (2, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_heldout_prompts_reach_their_own_domain(minilm):
    from index.corpus import load_corpus

    train, held = load_corpus(REPO / "index/data/default"), load_corpus(REPO / "index/data/heldout")
    vecs = {n: minilm.embed([r.text for r in rs]) for n, rs in train.domains.items()}
    index, labels = build_index(vecs, k=2, seed=0)
    total = hits = 0
    for name, recs in held.domains.items():
        got = nearest_domain(index, labels, minilm.embed([r.text for r in recs]))
        hits += sum(d == name for d, _ in got)
        total += len(recs)
    assert total >= 30
    assert hits / total >= 0.90, f"{hits}/{total} held-out prompts reached their own domain"
