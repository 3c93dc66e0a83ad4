"""Router against a real Redis, the real MiniLM embedder and real artefacts written with index.artefact.

Covers: cache hit/miss, TTL expiry, version bump hot reload (no restart), an in-flight request keeping its
version, a malformed cached value ignored and overwritten, a bad published version, tenant pinning, and
Redis killed mid-run and restarted on the same port.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from engine.config import DraftConfig
from index.artefact import DomainEntry, IndexManifest, new_version, now_iso, write_artefact
from index.embed import MINILM_ID, MiniLMEmbedder
from index.publish import publish_version
from router.cache import prompt_hash
from router.config import RouterConfig
from router.route import Router
from tests.timing import Window, with_growing_window

PROMPTS = {
    "code": [
        "Write a Python function that reverses a linked list.",
        "Implement quicksort in JavaScript and explain its complexity.",
        "Fix the bug in this C++ loop that reads past the end of the array.",
    ],
    "math": [
        "Solve for x: 3x + 7 = 22.",
        "What is the derivative of x^3 * sin(x)?",
        "A train travels 120 km in 1.5 hours. What is its average speed?",
    ],
    "translate": [
        "Translate into French: The weather is lovely today.",
        "Translate this sentence to German: Where is the train station?",
        "How do you say 'thank you very much' in Spanish?",
    ],
}
CODE_PROMPT = "Write a Python function that merges two sorted lists."
MATH_PROMPT = "Compute the integral of 2x from 0 to 3."
FAR_PROMPT = "zzqx vlorp 8841 %%% ~~~"


def cfg_v(n: int) -> DraftConfig:
    """A distinct config per artefact generation, so a decision shows which version made it."""
    return DraftConfig(skip_attn=(n,), max_draft=4)


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder(progress=False)


@pytest.fixture(scope="module")
def centroids(embedder):
    rows, labels = [], []
    for domain, prompts in sorted(PROMPTS.items()):
        v = embedder.embed(prompts).mean(axis=0)
        rows.append(v / np.linalg.norm(v))
        labels.append(domain)
    return np.stack(rows).astype(np.float32), labels


def write_version(root: Path, centroids, generation: int, threshold: float = 0.3) -> tuple[str, Path]:
    import faiss

    rows, labels = centroids
    index = faiss.IndexFlatIP(rows.shape[1])
    index.add(rows)
    domains = {
        d: DomainEntry(
            name=d, config=cfg_v(generation), speedup=1.1, acceptance=0.8, mean_accepted_tokens=2.0,
            n_prompts=3, n_centroids=1,
        )
        for d in labels
    }
    m = IndexManifest(
        version=new_version(), created_at=now_iso(), model_id="test-model", model_hash="test-hash",
        embedder_id=MINILM_ID, embedder_dim=rows.shape[1], representation="minilm", corpus_hash="test",
        distance_threshold=threshold, fallback_config=DraftConfig.plain(), domains=domains,
    )
    vdir = write_artefact(root, m, index, labels)
    return m.version, vdir


def write_and_publish(root: Path, centroids, generation: int, url: str, prefix: str) -> str:
    """`write_version`, then published in Redis (as the index job does); the version."""
    version, vdir = write_version(root, centroids, generation)
    publish_version(url, version, vdir, prefix=prefix)
    return version


def make_router(embedder, url: str, prefix: str, root: Path, **overrides) -> Router:
    kw = dict(
        redis_url=url, key_prefix=prefix, index_root=str(root), poll_interval_s=0.2, cache_ttl_s=60,
        backoff_initial_s=0.05, backoff_max_s=0.2,
    )
    kw.update(overrides)
    return Router.from_config(RouterConfig(**kw), embedder)


def wait_for(pred, timeout: float = 5.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


@pytest.fixture
def root(tmp_path):
    return tmp_path / "index"


def test_cache_miss_then_hit(embedder, centroids, redis_url, redis_prefix, root):
    v1 = write_and_publish(root, centroids, 1, redis_url, redis_prefix)
    router = make_router(embedder, redis_url, redis_prefix, root)
    try:
        d1 = router.route(CODE_PROMPT, tenant="acme")
        assert (d1.domain, d1.index_version, d1.cached, d1.fallback) == ("code", v1, False, False)
        assert d1.config == cfg_v(1)
        d2 = router.route("  write a python FUNCTION that merges two sorted lists. ", tenant="acme")
        assert d2.cached and d2.domain == "code" and d2.config_id == d1.config_id
        assert router.route(MATH_PROMPT, tenant="acme").domain == "math"
        far = router.route(FAR_PROMPT, tenant="acme")
        assert far.fallback and far.config == DraftConfig.plain()
        chat = router.route(
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": MATH_PROMPT}],
            tenant="acme",
        )
        assert chat.cached and chat.domain == "math"  # same user text as MATH_PROMPT

        s = router.stats
        assert (s.cache_hits, s.cache_misses, s.redis_errors) == (2, 3, 0)
        assert s.decisions["code"] == 2 and s.fallbacks == 1 and s.p50("embed") > 0
        r = redis.Redis.from_url(redis_url)
        key = f"{redis_prefix}knnssd:route:{v1}:acme:{prompt_hash(CODE_PROMPT)}"
        assert 0 < r.ttl(key) <= 60
    finally:
        router.close()


def test_ttl_expiry(embedder, centroids, redis_url, redis_prefix, root):
    """A decision is cached with the router's TTL, served while its key lives and recomputed once Redis has
    expired it. Events, not sleeps: the hit is asserted only when the key was provably alive when the
    second request ended (else, on a machine slower than the TTL, the run is repeated with a longer TTL),
    and the miss after Redis says the key is gone."""
    v1 = write_version(root, centroids, 1)[0]  # CURRENT only, nothing published: loaded from index_root
    r = redis.Redis.from_url(redis_url)

    def scenario(ttl: float) -> None:
        tenant = f"ttl-{ttl:g}"
        key = f"{redis_prefix}knnssd:route:{v1}:{tenant}:{prompt_hash(CODE_PROMPT)}"
        router = make_router(embedder, redis_url, redis_prefix, root, cache_ttl_s=int(ttl))
        try:
            w = Window(ttl)
            assert not router.route(CODE_PROMPT, tenant=tenant).cached
            assert 0 < r.pttl(key) <= ttl * 1000  # stored with the router's TTL
            hit = router.route(CODE_PROMPT, tenant=tenant).cached
            w.expect(hit, "a live cached decision was not served")
            assert wait_for(lambda: not r.exists(key), timeout=ttl + 30)  # Redis expired it
            assert not router.route(CODE_PROMPT, tenant=tenant).cached
            assert router.stats.cache_misses == 2 and router.stats.cache_hits == 1
        finally:
            router.close()

    try:
        with_growing_window(scenario, (1.0, 4.0, 16.0))
    finally:
        r.close()


def test_version_bump_hot_reloads_without_restart(embedder, centroids, redis_url, redis_prefix, root):
    v1 = write_and_publish(root, centroids, 1, redis_url, redis_prefix)
    router = make_router(embedder, redis_url, redis_prefix, root, poll_interval_s=3600.0)  # pub/sub must do it
    try:
        assert router.route(CODE_PROMPT).config == cfg_v(1)
        assert router.route(CODE_PROMPT).cached

        v2, vdir2 = write_version(root, centroids, 2)
        t0 = time.monotonic()
        publish_version(redis_url, v2, vdir2, prefix=redis_prefix)
        # polling would take an hour here: any reload within the (generous) wait came from the published message
        assert wait_for(lambda: router.source.current().version == v2, timeout=30.0, step=0.005)
        print(f"\nnew index version live in the router {time.monotonic() - t0:.3f} s after publish (pub/sub)")
        d = router.route(CODE_PROMPT)
        assert (d.index_version, d.config, d.cached) == (v2, cfg_v(2), False)  # old entry unreachable
        assert router.route(CODE_PROMPT).cached
        assert router.stats.reloads == 1
        # the v1 entry was not deleted, only left behind (it expires by TTL)
        r = redis.Redis.from_url(redis_url)
        assert r.exists(f"{redis_prefix}knnssd:route:{v1}:default:{prompt_hash(CODE_PROMPT)}")
    finally:
        router.close()


def test_version_bump_by_polling_without_pubsub(embedder, centroids, redis_url, redis_prefix, root):
    v1 = write_and_publish(root, centroids, 1, redis_url, redis_prefix)
    router = make_router(embedder, redis_url, redis_prefix, root, use_pubsub=False, poll_interval_s=0.1)
    try:
        v2 = write_and_publish(root, centroids, 2, redis_url, redis_prefix)
        assert wait_for(lambda: router.source.current().version == v2, timeout=3.0)
    finally:
        router.close()


class GatedEmbedder:
    """Blocks inside embed() until released, to hold a request in flight."""

    def __init__(self, inner):
        self.inner, self.id, self.dim = inner, inner.id, inner.dim
        self.entered, self.release = threading.Event(), threading.Event()

    def embed(self, texts):
        self.entered.set()
        assert self.release.wait(10)
        return self.inner.embed(texts)


def test_in_flight_request_keeps_its_version(embedder, centroids, redis_url, redis_prefix, root):
    v1 = write_and_publish(root, centroids, 1, redis_url, redis_prefix)
    gated = GatedEmbedder(embedder)
    router = make_router(gated, redis_url, redis_prefix, root)
    router.source.stop()  # reload by hand below, for a deterministic interleaving
    try:
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("d", router.route(CODE_PROMPT)))
        t.start()
        assert gated.entered.wait(10)
        v2 = write_and_publish(root, centroids, 2, redis_url, redis_prefix)
        assert router.source.check_now()
        gated.release.set()
        t.join(10)
        assert (out["d"].index_version, out["d"].config) == (v1, cfg_v(1))
        d = router.route(CODE_PROMPT)
        assert (d.index_version, d.config) == (v2, cfg_v(2))
    finally:
        gated.release.set()
        router.close()


@pytest.mark.parametrize("bad", [b"{not json", b'{"domain": "code"}', b"\xff\xfe", "wrongtype"])
def test_malformed_cached_value_is_ignored_and_overwritten(embedder, centroids, redis_url, redis_prefix, root, bad):
    v1 = write_and_publish(root, centroids, 1, redis_url, redis_prefix)
    router = make_router(embedder, redis_url, redis_prefix, root)
    r = redis.Redis.from_url(redis_url)
    key = f"{redis_prefix}knnssd:route:{v1}:default:{prompt_hash(CODE_PROMPT)}"
    try:
        if bad == "wrongtype":
            r.rpush(key, "x")  # a key of the wrong type: GET raises WRONGTYPE
        else:
            r.set(key, bad)
        d = router.route(CODE_PROMPT)
        assert d.domain == "code" and not d.cached
        assert router.stats.cache_malformed + router.stats.redis_errors == 1
        assert router.cache.link.up  # a refused command is not an outage
        assert router.route(CODE_PROMPT).cached  # overwritten with a valid decision
    finally:
        router.close()


def test_cached_value_from_another_version_is_rejected(embedder, centroids, redis_url, redis_prefix, root):
    v1 = write_and_publish(root, centroids, 1, redis_url, redis_prefix)
    router = make_router(embedder, redis_url, redis_prefix, root)
    try:
        d = router.route(CODE_PROMPT)
        key = f"{redis_prefix}knnssd:route:{v1}:default:{prompt_hash(CODE_PROMPT)}"
        forged = d.model_copy(update={"index_version": "other"}).model_dump_json(exclude={"cached"})
        redis.Redis.from_url(redis_url).set(key, forged)
        assert not router.route(CODE_PROMPT).cached and router.stats.cache_malformed == 1
    finally:
        router.close()


def test_bad_published_version_keeps_serving_the_old_one(embedder, centroids, redis_url, redis_prefix, root):
    v1 = write_and_publish(root, centroids, 1, redis_url, redis_prefix)
    router = make_router(embedder, redis_url, redis_prefix, root)
    router.source.stop()
    try:
        publish_version(redis_url, "20990101T000000-deadbeef", root / "nowhere", prefix=redis_prefix)
        assert not router.source.check_now()
        assert not router.source.check_now()  # not retried until the key changes
        assert router.stats.reload_errors == 1
        assert router.route(CODE_PROMPT).index_version == v1
    finally:
        router.close()


def test_tenant_pinned_to_old_version(embedder, centroids, redis_url, redis_prefix, root):
    v1, _ = write_version(root, centroids, 1)
    v2 = write_and_publish(root, centroids, 2, redis_url, redis_prefix)
    router = make_router(embedder, redis_url, redis_prefix, root)
    try:
        router.source.pin("legacy", v1)
        assert router.route(CODE_PROMPT, tenant="legacy").index_version == v1
        assert router.route(CODE_PROMPT, tenant="other").index_version == v2
        router.source.unpin("legacy")
        assert router.route(CODE_PROMPT, tenant="legacy").index_version == v2
    finally:
        router.close()


@pytest.mark.slow
def test_redis_killed_mid_run_then_restarted(embedder, centroids, root):
    from router.redis_server import start_redis_server

    url, proc = start_redis_server()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    v1 = write_and_publish(root, centroids, 1, url, "")
    router = make_router(embedder, url, "", root)
    proc2 = None
    try:
        assert not router.route(CODE_PROMPT).cached
        assert router.route(CODE_PROMPT).cached

        # baseline: the same route computed without the cache (a fresh tenant each time) while Redis is up
        t0 = time.perf_counter()
        for i in range(20):
            assert not router.route(CODE_PROMPT, tenant=f"baseline-{i}").cached
        alive = (time.perf_counter() - t0) / 20

        proc.kill()
        proc.wait(10)
        t0 = time.perf_counter()
        for _ in range(20):
            d = router.route(CODE_PROMPT)
            assert d.domain == "code" and not d.cached and d.index_version == v1
        per_request = (time.perf_counter() - t0) / 20
        errors = router.stats.redis_errors
        assert errors >= 1 and router.stats.redis_skipped >= 1
        # no blocking on the dead Redis: a decision costs what an uncached one costs with Redis up (which also
        # writes to Redis), not a socket timeout per request (relative to the baseline, so load slows both)
        print(f"\nroute with Redis dead {per_request * 1e3:.1f} ms, uncached with Redis up {alive * 1e3:.1f} ms")
        assert per_request < 3 * alive + 0.01
        time.sleep(0.5)  # past the backoff: the reloader and the next request probe again
        router.route(MATH_PROMPT)
        assert router.stats.redis_errors > errors

        url2, proc2 = start_redis_server(port=port)
        assert url2 == url
        # Recovers by itself: once the backoff passes, decisions are stored and served from Redis again.
        assert wait_for(lambda: router.route(CODE_PROMPT).cached, timeout=5.0, step=0.1)
        assert router.source.current().version == v1

        # The reloader's pub/sub resubscribes too: a bump after the restart is picked up.
        v2 = write_and_publish(root, centroids, 2, url, "")
        assert wait_for(lambda: router.source.current().version == v2, timeout=5.0)
    finally:
        router.close()
        for p in (proc, proc2):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
