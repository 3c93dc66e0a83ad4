"""Pure router logic with small fakes: voting, fallback, routing text, cache keys, stats, Redis backoff."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import redis

from engine.config import DraftConfig
from index.artefact import Artefact, DomainEntry, IndexManifest
from router.cache import RedisLink, RouteCache, normalise_prompt, prompt_hash
from router.config import RouterConfig
from router.decision import FALLBACK_DOMAIN, RouteDecision
from router.reload import StaticSource
from router.route import Router, decide, routing_text, vote
from router.stats import RouteStats, percentile

DIM = 4
CODE = DraftConfig(skip_attn=(3, 5), max_draft=6)
MATH = DraftConfig(skip_mlp=(7,), max_draft=3)
FALLBACK = DraftConfig.plain()


def entry(name: str, cfg: DraftConfig) -> DomainEntry:
    return DomainEntry(
        name=name, config=cfg, speedup=1.2, acceptance=0.8, mean_accepted_tokens=2.0, n_prompts=10, n_centroids=2
    )


def manifest(version: str = "20260101T000000-aaaaaaaa", threshold: float = 0.5) -> IndexManifest:
    return IndexManifest(
        version=version,
        created_at="2026-01-01T00:00:00+00:00",
        model_id="fake",
        model_hash="h",
        embedder_id="fake-embedder",
        embedder_dim=DIM,
        representation="minilm",
        corpus_hash="c",
        distance_threshold=threshold,
        fallback_config=FALLBACK,
        domains={"code": entry("code", CODE), "math": entry("math", MATH)},
    )


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def fake_artefact(version: str = "20260101T000000-aaaaaaaa", threshold: float = 0.5) -> Artefact:
    # two code centroids near e0, two math centroids near e1
    cents = np.stack([unit(1, 0.1, 0, 0), unit(1, -0.1, 0, 0), unit(0, 1, 0.1, 0), unit(0.1, 1, 0, 0)])
    index = faiss.IndexFlatIP(DIM)
    index.add(cents)
    return Artefact(manifest=manifest(version, threshold), index=index, labels=["code", "code", "math", "math"], path=Path("/x"))


class FakeEmbedder:
    """Maps a prompt's first word to a fixed direction; counts calls."""

    id = "fake-embedder"
    dim = DIM
    table = {"code": unit(1, 0, 0, 0), "math": unit(0, 1, 0, 0), "far": unit(0, 0, 0, 1), "mixed": unit(1, 0.9, 0, 0)}

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        return np.stack([self.table[t.split()[0].lower()] for t in texts]).astype(np.float32)


class DictRedis:
    """In-memory stand-in for the few redis.Redis methods the cache uses."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttl: dict[str, int] = {}
        self.fail = False

    def get(self, key):
        if self.fail:
            raise redis.ConnectionError("refused")
        return self.data.get(key)

    def set(self, key, value, ex=None):
        if self.fail:
            raise redis.ConnectionError("refused")
        self.data[key] = value.encode() if isinstance(value, str) else value
        self.ttl[key] = ex
        return True


# -- voting and fallback --------------------------------------------------------------------------


def test_vote_weights_by_similarity_not_count():
    # two weak math neighbours (0.3 + 0.3) lose to one strong code neighbour (0.9)
    assert vote([0.9, 0.3, 0.3], ["code", "math", "math"]) == ("code", pytest.approx(0.9))
    # two strong math neighbours beat one slightly stronger code neighbour
    assert vote([0.9, 0.85, 0.8], ["code", "math", "math"]) == ("math", pytest.approx(0.85))


def test_vote_ignores_negative_similarity_and_breaks_ties_by_best():
    assert vote([0.5, -0.9, -0.9], ["a", "b", "b"])[0] == "a"
    # equal weights: the domain with the single best neighbour wins
    assert vote([0.6, 0.3, 0.3], ["a", "b", "b"])[0] == "a"
    # fully equal: name order, deterministic
    assert vote([0.5, 0.5], ["b", "a"])[0] == "b"


def test_decide_routes_above_threshold_and_falls_back_below():
    m = manifest(threshold=0.5)
    d = decide([0.8, 0.7], ["code", "math"], m)
    assert (d.domain, d.config, d.fallback, d.nearest_domain) == ("code", CODE, False, "code")
    assert d.config_id == CODE.config_id and d.index_version == m.version

    far = decide([0.4, 0.3], ["code", "math"], m)
    assert far.fallback and far.domain == FALLBACK_DOMAIN and far.config == FALLBACK
    assert far.config_id == "plain" and far.nearest_domain == "code"

    # a config override beats the manifest threshold
    assert not decide([0.4], ["code"], m, threshold=0.3).fallback
    assert decide([0.8], ["code"], m, threshold=0.9).fallback


def test_decide_without_neighbours_or_with_unknown_domain_falls_back():
    m = manifest()
    assert decide([], [], m).fallback
    d = decide([0.99], ["unknown"], m)
    assert d.fallback and d.nearest_domain == "unknown"


def test_routing_text_uses_user_turns():
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {}}]},
    ]
    assert routing_text(messages=msgs) == "first\n\nsecond"
    assert routing_text("plain prompt") == "plain prompt"
    assert routing_text(messages=[{"role": "system", "content": "only system"}]) == "only system"


def test_route_decision_rejects_inconsistent_config_id():
    with pytest.raises(ValueError):
        RouteDecision(domain="code", config=CODE, config_id="ssd-0000000000", similarity=1.0, index_version="v")


# -- router with fakes ----------------------------------------------------------------------------


def test_router_votes_and_falls_back_end_to_end():
    emb = FakeEmbedder()
    router = Router(emb, StaticSource(fake_artefact()), config=RouterConfig(redis_url=None, k=3))
    assert router.route("code write a loop").domain == "code"
    assert router.route(messages=[{"role": "user", "content": "math problem"}]).domain == "math"
    far = router.route("far away text")
    assert far.fallback and far.config == FALLBACK
    s = router.stats
    assert s.requests == 3 and s.fallbacks == 1 and s.decisions["code"] == 1 and s.decisions[FALLBACK_DOMAIN] == 1
    assert len(s.latency["embed"]) == 3 and len(s.latency["search"]) == 3


def test_router_uses_cache_and_overwrites_malformed_values():
    emb, fake = FakeEmbedder(), DictRedis()
    stats = RouteStats()
    link = RedisLink("redis://unused:1/0", stats)
    link.client = fake  # type: ignore[assignment]
    cache = RouteCache(link, ttl_s=60, stats=stats)
    router = Router(emb, StaticSource(fake_artefact()), cache=cache, stats=stats)

    first = router.route("code   Sort a list", tenant="t1")
    assert not first.cached and emb.calls == 1 and stats.cache_misses == 1
    again = router.route("CODE sort a list ", tenant="t1")  # same after normalisation
    assert again.cached and again.domain == "code" and emb.calls == 1 and stats.cache_hits == 1
    (key,) = fake.data
    assert key == f"knnssd:route:{first.index_version}:t1:{prompt_hash('code sort a list')}"
    assert fake.ttl[key] == 60

    router.route("code sort a list", tenant="t2")  # another tenant: its own entry
    assert emb.calls == 2

    fake.data[key] = b"{not json"
    d = router.route("code sort a list", tenant="t1")
    assert not d.cached and emb.calls == 3 and stats.cache_malformed == 1
    assert RouteDecision.model_validate_json(fake.data[key]).domain == "code"  # overwritten


def test_redis_errors_back_off_and_never_fail_routing():
    now = [0.0]
    emb, fake = FakeEmbedder(), DictRedis()
    stats = RouteStats()
    link = RedisLink("redis://unused:1/0", stats, backoff_initial_s=0.1, backoff_max_s=0.4, clock=lambda: now[0])
    link.client = fake  # type: ignore[assignment]
    router = Router(emb, StaticSource(fake_artefact()), cache=RouteCache(link, stats=stats), stats=stats)

    fake.fail = True
    assert router.route("code x").domain == "code"  # get fails -> backoff; put is skipped
    assert stats.redis_errors == 1 and stats.redis_skipped == 1 and not link.up
    assert router.route("code x").domain == "code"  # still in backoff: Redis not touched
    assert stats.redis_errors == 1 and stats.redis_skipped == 3
    now[0] = 0.11
    router.route("code x")  # probe fails again: backoff doubles to 0.2
    assert stats.redis_errors == 2
    now[0] = 0.2
    assert not link.up
    now[0] = 0.32
    fake.fail = False
    router.route("code x")  # recovered: miss, then stored
    assert link.up and stats.cache_misses == 1 and len(fake.data) == 1
    assert router.route("code x").cached


def test_backoff_is_capped():
    now = [0.0]
    link = RedisLink("redis://unused:1/0", backoff_initial_s=0.1, backoff_max_s=0.25, clock=lambda: now[0])
    fake = DictRedis()
    fake.fail = True
    link.client = fake  # type: ignore[assignment]
    for _ in range(5):
        link.call(lambda r: r.get("k"), None)
        now[0] += 10
    assert link._backoff == pytest.approx(0.25)


# -- small helpers --------------------------------------------------------------------------------


def test_normalise_prompt():
    assert normalise_prompt("  Hello\n\tWORLD  ") == "hello world"
    assert normalise_prompt("e\u0301") == normalise_prompt("\u00e9")  # NFC


def test_percentile_and_stats_snapshot():
    assert percentile([], 50) == 0.0
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(51.0, abs=1)
    assert percentile(xs, 99) == pytest.approx(99.0, abs=1)
    s = RouteStats()
    for x in (0.001, 0.002, 0.003):
        s.observe_latency("embed", x)
    s.observe_cache(hit=True)
    s.observe_cache(hit=False)
    assert s.p50("embed") == pytest.approx(0.002) and s.cache_hit_rate == 0.5
    snap = s.snapshot()
    assert snap["latency_ms"]["embed"]["n"] == 3 and snap["cache_hits"] == 1
    with pytest.raises(ValueError):
        s.observe_latency("nope", 1.0)
