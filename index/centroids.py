"""Per-domain k-means centroids and one inner-product FAISS index over all of them.

Input: unit-norm embeddings per domain. Output: a `faiss.IndexFlatIP` whose rows are the (re-normalised)
centroids, and `labels[i]`, the domain of row i. Scores are cosine similarities. k is clamped to the
number of prompts of a domain; k-means is spherical and seeded, so the same inputs give the same index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from index.embed import l2_normalise


@dataclass(frozen=True)
class Match:
    """One neighbour of a query: the centroid's domain, its cosine similarity, and its row."""

    label: str
    score: float
    row: int


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 25) -> np.ndarray:
    """Spherical k-means of unit rows x [N, d] -> unit centroids [min(k, N), d]."""
    import faiss

    assert x.ndim == 2 and x.shape[0] > 0, x.shape
    x = np.ascontiguousarray(l2_normalise(x))
    k = max(1, min(int(k), x.shape[0]))
    if k == 1:
        return l2_normalise(x.mean(axis=0, keepdims=True))
    if k == x.shape[0]:
        return x.copy()
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=int(seed), spherical=True, min_points_per_centroid=1, max_points_per_centroid=100000
    )
    km.train(x)
    return l2_normalise(km.centroids)


def build_index(vectors: dict[str, np.ndarray], k: int, seed: int = 0) -> tuple[object, list[str]]:
    """k-means per domain (domains in sorted order) -> (faiss.IndexFlatIP over all centroids, labels)."""
    import faiss

    if not vectors:
        raise ValueError("no domains to index")
    dims = {v.shape[1] for v in vectors.values()}
    if len(dims) != 1:
        raise ValueError(f"domains have different embedding dimensions: {sorted(dims)}")
    d = dims.pop()
    rows, labels = [], []
    for i, name in enumerate(sorted(vectors)):
        c = kmeans(vectors[name], k, seed=seed + i)
        rows.append(c)
        labels.extend([name] * len(c))
    index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(np.concatenate(rows).astype(np.float32)))
    return index, labels


def lookup(index: object, labels: list[str], queries: np.ndarray, k: int = 1) -> list[list[Match]]:
    """Nearest `k` centroids of each query row [N, d] (unit norm), best first."""
    q = np.ascontiguousarray(np.atleast_2d(queries).astype(np.float32))
    k = max(1, min(int(k), int(index.ntotal)))
    scores, rows = index.search(q, k)
    return [
        [Match(label=labels[int(r)], score=float(s), row=int(r)) for s, r in zip(srow, rrow) if r >= 0]
        for srow, rrow in zip(scores, rows)
    ]


def nearest_domain(index: object, labels: list[str], queries: np.ndarray) -> list[tuple[str, float]]:
    """(domain, cosine similarity) of the single nearest centroid of each query."""
    return [(m[0].label, m[0].score) for m in lookup(index, labels, queries, k=1)]


def similarity_threshold(index: object, labels: list[str], vectors: dict[str, np.ndarray], quantile: float, margin: float) -> float:
    """A fallback threshold: the `quantile` of corpus prompts' similarity to their nearest centroid,
    minus `margin`. Prompts less similar than this to every centroid are unlike the corpus."""
    sims = [s for v in vectors.values() for _, s in nearest_domain(index, labels, v)]
    return float(max(0.0, np.quantile(np.asarray(sims), quantile) - margin))
