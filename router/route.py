"""Route one prompt to a draft configuration: embed -> k nearest centroids -> similarity-weighted vote.

`Router.route` never fails because of Redis: the decision cache is consulted first when it answers, and
the local FAISS index decides otherwise. A prompt whose nearest centroid is less similar than the
threshold (config override, else the manifest's) gets the manifest's fallback config. Each request takes
one artefact reference at its start (`source.current(tenant)`) and finishes on it even if a reload swaps
in a new version meanwhile.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from index.artefact import Artefact, IndexManifest
from index.corpus import routing_text  # re-exported: services and tests import it from here
from index.embed import Embedder
from router.cache import RedisLink, RouteCache
from router.config import RouterConfig
from router.decision import FALLBACK_DOMAIN, RouteDecision
from router.reload import ArtefactSource, Reloader
from router.stats import RouteStats

__all__ = ["FALLBACK_DOMAIN", "RouteDecision", "Router", "decide", "routing_text", "vote"]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads. torch (OpenMP, MKL) keeps this setting per OS thread,
    so other threads (an engine decoding beside the router) are not affected; restored on exit."""
    if n is None:
        yield
        return
    import torch

    prev = torch.get_num_threads()
    if prev == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def vote(sims: Sequence[float], labels: Sequence[str]) -> tuple[str, float]:
    """Similarity-weighted vote over the k nearest centroids.

    Each neighbour adds max(similarity, 0) to its domain; the heaviest domain wins, ties going to the
    domain with the most similar single centroid, then to the name. Returns (domain, best similarity of
    that domain's neighbours). `sims` is sorted or not; `labels[i]` is the domain of neighbour i.
    """
    assert len(sims) == len(labels) and len(sims) > 0, "vote needs at least one neighbour"
    weight: dict[str, float] = {}
    best: dict[str, float] = {}
    for s, d in zip(sims, labels):
        s = float(s)
        weight[d] = weight.get(d, 0.0) + max(s, 0.0)
        best[d] = max(best.get(d, -np.inf), s)
    domain = max(weight, key=lambda d: (weight[d], best[d], d))
    return domain, best[domain]


def decide(
    sims: Sequence[float],  # [k] cosine similarities, FAISS order (-1 ids already dropped)
    labels: Sequence[str],  # [k] domain of each neighbour
    manifest: IndexManifest,
    threshold: float | None = None,
) -> RouteDecision:
    """Pure decision logic: vote, then fall back if the nearest centroid is below the threshold. The
    fallback config may itself be plain; whether a request then decodes plainly is decided in one place,
    `engine.plain.plain_reason`, which the engine asks of the config it is given."""
    thr = manifest.distance_threshold if threshold is None else threshold
    if len(sims) == 0:
        return RouteDecision(
            domain=FALLBACK_DOMAIN, config=manifest.fallback_config, similarity=-1.0,
            index_version=manifest.version, fallback=True,
        )
    domain, sim = vote(sims, labels)
    top = float(max(sims))
    entry = manifest.domains.get(domain)
    if top < thr or entry is None:
        return RouteDecision(
            domain=FALLBACK_DOMAIN, config=manifest.fallback_config, similarity=sim,
            index_version=manifest.version, fallback=True, nearest_domain=domain,
        )
    return RouteDecision(
        domain=domain, config=entry.config, similarity=sim, index_version=manifest.version,
        fallback=False, nearest_domain=domain,
    )


class Router:
    """Prompt -> `RouteDecision`. Collaborators are injected; `Router.from_config` wires the real ones."""

    def __init__(
        self,
        embedder: Embedder,
        source: ArtefactSource,
        *,
        cache: RouteCache | None = None,
        stats: RouteStats | None = None,
        config: RouterConfig | None = None,
    ) -> None:
        self.embedder = embedder
        self.source = source
        self.cache = cache
        self.config = config or RouterConfig(redis_url=None)
        self.stats = stats if stats is not None else (cache.stats if cache is not None else RouteStats())

    @classmethod
    def from_config(
        cls, config: RouterConfig, embedder: Embedder | None = None, *, start_reloader: bool = True
    ) -> Router:
        """Real wiring: MiniLM (unless given), a guarded Redis link, the decision cache and a Reloader."""
        if embedder is None:
            from index.embed import MiniLMEmbedder

            embedder = MiniLMEmbedder(progress=False)
        stats = RouteStats()
        link = cache = None
        if config.redis_url:
            link = RedisLink(
                config.redis_url,
                stats,
                socket_timeout_s=config.socket_timeout_s,
                connect_timeout_s=config.connect_timeout_s,
                backoff_initial_s=config.backoff_initial_s,
                backoff_max_s=config.backoff_max_s,
            )
            cache = RouteCache(link, ttl_s=config.cache_ttl_s, key_prefix=config.key_prefix, stats=stats)
        source = Reloader(
            link,
            index_root=config.index_root,
            key_prefix=config.key_prefix,
            poll_interval_s=config.poll_interval_s,
            use_pubsub=config.use_pubsub,
            expect_model_hash=config.expect_model_hash,
            expect_embedder_id=embedder.id,
            stats=stats,
        )
        if start_reloader:
            source.start()
        return cls(embedder, source, cache=cache, stats=stats, config=config)

    def close(self) -> None:
        if isinstance(self.source, Reloader):
            self.source.stop()
        if self.cache is not None:
            self.cache.link.close()

    def route(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any] | Any] | None = None,
        tenant: str = "default",
        artefact: Artefact | None = None,
    ) -> RouteDecision:
        """Decide the draft config for one request. `artefact` overrides the source (the caller holds it)."""
        t_start = time.perf_counter()
        art = artefact if artefact is not None else self.source.current(tenant)
        text = routing_text(prompt, messages)
        version = art.version

        cached = None
        t_cache = 0.0
        if self.cache is not None:
            t0 = time.perf_counter()
            cached = self.cache.get(version, tenant, text)
            t_cache = time.perf_counter() - t0
        if cached is not None:
            self._observe(cached, t_cache, t_start)
            return cached

        decision = self.decide_local(text, art)
        if self.cache is not None:
            t0 = time.perf_counter()
            self.cache.put(decision, tenant, text)
            t_cache += time.perf_counter() - t0
        self._observe(decision, t_cache, t_start)
        return decision

    def decide_local(self, text: str, art: Artefact) -> RouteDecision:
        """Embed and search the local index (no Redis)."""
        t0 = time.perf_counter()
        with torch_threads(self.config.embed_threads):
            vec = np.ascontiguousarray(self.embedder.embed([text]), dtype=np.float32)  # [1, dim]
        t1 = time.perf_counter()
        assert vec.shape == (1, art.index.d), f"embedding shape {vec.shape} != (1, {art.index.d})"
        k = min(self.config.k, art.index.ntotal)
        sims, ids = art.index.search(vec, k)  # [1, k] each
        t2 = time.perf_counter()
        self.stats.observe_latency("embed", t1 - t0)
        self.stats.observe_latency("search", t2 - t1)
        keep = [(float(s), art.labels[i]) for s, i in zip(sims[0], ids[0]) if i >= 0]
        return decide([s for s, _ in keep], [d for _, d in keep], art.manifest, self.config.distance_threshold)

    def _observe(self, decision: RouteDecision, t_cache: float, t_start: float) -> None:
        if self.cache is not None:
            self.stats.observe_latency("cache", t_cache)
        self.stats.observe_latency("total", time.perf_counter() - t_start)
        self.stats.observe_decision(decision.domain, decision.fallback, decision.cached)
