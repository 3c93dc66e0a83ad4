"""The gateway against a real Redis: tenants, shared rate limits (429 then recovery), usage isolation,
and a Redis outage (limits fail open and are counted; unknown Redis keys get 503, never 401)."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from services.backend import BackendChunk, BackendRequest, RouteInfo, Usage
from services.config import AppConfig, LimitsConfig
from services.gateway import build_gateway_app
from services.limits import RateLimiter
from services.metrics import ServiceMetrics
from router.redis_server import free_port
from services.tenants import Tenant, TenantStore
from deploy.tenants_cli import tenants_app
from services.usage import UsageStore
from tests.timing import Window, with_growing_window

MODEL = "smollm2"
WINDOW_S = 1.0  # the default; scenarios that count requests in a window grow it on a slow machine (tests.timing)
BODY = {"model": MODEL, "prompt": "two words", "max_tokens": 8}  # the fake answers 2 prompt + 3 completion tokens


class FakeBackend:
    def models(self) -> list[str]:
        return [MODEL]

    async def stream(self, req: BackendRequest):
        route = RouteInfo(domain="chat", config_id="ssd-x", index_version="1")
        yield BackendChunk(text="a", tokens=1, route=route, usage=Usage(2, 0))
        yield BackendChunk(text=" b", tokens=1)
        yield BackendChunk(text=" c", tokens=1, finish_reason="stop", route=route, usage=Usage(2, 3),
                           stats={"drafted": 2, "accepted": 2, "steps": 1, "acceptance_rate": 1.0})


@pytest.fixture
def rclient(redis_url):
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    yield client
    client.close()


@pytest.fixture
def down_client():
    """A client for a port nothing listens on: every call fails fast."""
    client = AppConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0").redis_client()  # no retries
    yield client
    client.close()


def make_app(rclient, prefix, *, limits_client=None, usage_client=None, tenants=(), metrics=None, window_s=WINDOW_S,
             **limits):
    config = AppConfig(limits=LimitsConfig(window_s=window_s, **limits))
    store = TenantStore(rclient, prefix=prefix, tenants=list(tenants), cache_s=0)
    limiter = RateLimiter(limits_client or rclient, prefix=prefix, window_s=window_s)
    usage = UsageStore(usage_client or rclient, prefix=prefix)
    return build_gateway_app(FakeBackend(), store, limiter, usage, metrics or ServiceMetrics(), config)


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_tenants_in_redis(rclient, redis_prefix):
    store = TenantStore(rclient, prefix=redis_prefix, cache_s=0)
    t, key = store.add("acme", rpm=7, index_version="v3")
    with pytest.raises(ValueError):
        store.add("acme")
    with pytest.raises(ValueError):
        store.add("other", key=key)  # one key, one tenant
    for raw in rclient.hgetall(redis_prefix + "tenants").values():
        assert key.encode() not in raw
    got = store.authenticate(key)
    assert got is not None and (got.name, got.rpm, got.index_version) == ("acme", 7, "v3")
    assert store.authenticate(key[:-1] + "x") is None
    assert [x.name for x, _ in store.list_tenants()] == ["acme"]
    assert store.remove("acme") and not store.remove("acme")
    assert store.authenticate(key) is None


def test_tenants_cli(redis_url, redis_prefix, rclient, tmp_path):
    runner = CliRunner()
    common = ["--redis-url", redis_url, "--prefix", redis_prefix]
    r = runner.invoke(tenants_app, ["add", "cli-co", "--rpm", "5", "--tpm", "1000", *common])
    assert r.exit_code == 0, r.output
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-knnssd-")
    assert TenantStore(rclient, prefix=redis_prefix).authenticate(key).name == "cli-co"
    r = runner.invoke(tenants_app, ["add", "cli-co", *common])
    assert r.exit_code == 1
    r = runner.invoke(tenants_app, ["list", *common])
    assert r.exit_code == 0 and "cli-co" in r.stdout and key not in r.stdout and "1000" in r.stdout
    assert runner.invoke(tenants_app, ["remove", "cli-co", *common]).exit_code == 0
    assert runner.invoke(tenants_app, ["remove", "cli-co", *common]).exit_code == 1
    assert TenantStore(rclient, prefix=redis_prefix).authenticate(key) is None
    # file mode
    path = str(tmp_path / "tenants.yaml")
    r = runner.invoke(tenants_app, ["add", "filed", "--file", path])
    assert r.exit_code == 0 and "filed" in runner.invoke(tenants_app, ["list", "--file", path]).stdout


def test_request_limit_429_then_recovery(rclient, redis_prefix):
    store = TenantStore(rclient, prefix=redis_prefix)

    def scenario(window_s: float) -> None:
        _, key = store.add(f"limited-{window_s:g}", rpm=3, tpm=0)
        with TestClient(make_app(rclient, redis_prefix, window_s=window_s)) as c:
            w = Window(window_s)
            remaining = []
            for _ in range(3):
                r = c.post("/v1/completions", json=BODY, headers=auth(key))
                assert r.status_code == 200, r.text
                assert r.headers["x-ratelimit-limit-requests"] == "3"
                remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
                assert "x-ratelimit-limit-tokens" not in r.headers  # tpm 0: unlimited, no header
            w.expect(remaining == [2, 1, 0], remaining)
            r = c.post("/v1/completions", json=BODY, headers=auth(key))
            w.expect(r.status_code == 429, r.text)
            err = r.json()["error"]
            assert (err["type"], err["code"]) == ("requests", "rate_limit_exceeded")
            assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining-requests"] == "0"
            wait_ms = int(r.headers["retry-after-ms"])
            assert 0 < wait_ms <= window_s * 1000
            again = c.post("/v1/completions", json=BODY, headers=auth(key)).status_code
            w.expect(again == 429, again)  # refusals don't count
            time.sleep(wait_ms / 1000 + 0.05)  # the oldest entry has left the window: admitted, however slow
            r = c.post("/v1/completions", json=BODY, headers=auth(key))
            assert r.status_code == 200, r.text

    with_growing_window(scenario)


def test_token_limit(rclient, redis_prefix):
    def scenario(window_s: float) -> None:
        _, key = TenantStore(rclient, prefix=redis_prefix).add(f"tok-{window_s:g}", rpm=0, tpm=8)
        with TestClient(make_app(rclient, redis_prefix, window_s=window_s)) as c:
            w = Window(window_s)
            r1 = c.post("/v1/completions", json=BODY, headers=auth(key))
            assert r1.status_code == 200 and r1.headers["x-ratelimit-remaining-tokens"] == "8"
            r2 = c.post("/v1/completions", json=BODY, headers=auth(key))  # 5 used < 8: admitted, ends at 10
            w.expect(r2.status_code == 200 and r2.headers["x-ratelimit-remaining-tokens"] == "3", r2.headers)
            r3 = c.post("/v1/completions", json=BODY, headers=auth(key))
            w.expect(r3.status_code == 429, r3.text)
            assert r3.json()["error"]["type"] == "tokens"
            time.sleep(int(r3.headers["retry-after-ms"]) / 1000 + 0.05)
            assert c.post("/v1/completions", json=BODY, headers=auth(key)).status_code == 200

    with_growing_window(scenario)


def test_limits_are_shared_by_gateway_replicas(rclient, redis_prefix):
    def scenario(window_s: float) -> None:
        _, key = TenantStore(rclient, prefix=redis_prefix).add(f"shared-{window_s:g}", rpm=4, tpm=0)
        with (TestClient(make_app(rclient, redis_prefix, window_s=window_s)) as a,
              TestClient(make_app(rclient, redis_prefix, window_s=window_s)) as b):
            w = Window(window_s)
            codes = [(a if i % 2 else b).post("/v1/completions", json=BODY, headers=auth(key)).status_code
                     for i in range(6)]
            w.expect(codes == [200] * 4 + [429] * 2, codes)

    with_growing_window(scenario)


def test_limiter_is_atomic_under_concurrency(rclient, redis_prefix):
    limiter = RateLimiter(rclient, prefix=redis_prefix, window_s=5)
    results = []
    lock = threading.Lock()

    def hit():
        res = limiter.check("race", rpm=5, tpm=0)
        with lock:
            results.append(res.allowed)

    threads = [threading.Thread(target=hit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 5


def test_usage_is_per_tenant_and_private(rclient, redis_prefix):
    store = TenantStore(rclient, prefix=redis_prefix)
    _, ka = store.add("alice", rpm=0, tpm=0)
    _, kb = store.add("bob", rpm=0, tpm=0)
    with TestClient(make_app(rclient, redis_prefix)) as c:
        for _ in range(2):
            assert c.post("/v1/completions", json=BODY, headers=auth(ka)).status_code == 200
        with c.stream("POST", "/v1/completions", json={**BODY, "stream": True}, headers=auth(kb)) as r:
            r.read()
        ua = c.get("/v1/usage", headers=auth(ka)).json()
        ub = c.get("/v1/usage?tenant=alice", headers=auth(kb)).json()  # asking for another tenant is ignored
        assert c.get("/v1/usage").status_code == 401
    assert ua["tenant"] == "alice" and ua["total"] == {
        "requests": 2, "prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    assert ub["tenant"] == "bob" and ub["total"]["requests"] == 1 and ub["total"]["completion_tokens"] == 3
    assert list(ua["daily"].values())[0]["requests"] == 2
    assert ua["limits"]["rpm"] == 0


def test_redis_outage_limits_fail_open(rclient, down_client, redis_prefix):
    """Tenants from the file still authenticate; limits and usage fail open and are counted."""
    tenant, key = Tenant.create("filed", rpm=1)
    metrics = ServiceMetrics()
    app = make_app(rclient, redis_prefix, limits_client=down_client, usage_client=down_client,
                   tenants=[tenant], metrics=metrics)
    with TestClient(app) as c:
        for _ in range(3):  # rpm=1, but the limiter cannot be asked: admitted
            r = c.post("/v1/completions", json=BODY, headers=auth(key))
            assert r.status_code == 200, r.text
            assert "x-ratelimit-limit-requests" not in r.headers
        assert c.get("/v1/usage", headers=auth(key)).status_code == 503
    assert metrics.value("knnssd_redis_errors_total", {"component": "limits"}) >= 3
    assert metrics.value("knnssd_redis_errors_total", {"component": "usage"}) >= 3


def test_limiter_breaker_skips_redis_after_a_failure(down_client):
    """A failed Redis call opens the breaker: the next checks fail open without calling Redis at all (a hung
    Redis costs one timeout, not one per request) until the cool-down ends, then Redis is tried again.
    Counted calls, not elapsed time: the cool-down is set long enough that no machine outlasts it."""
    limiter = RateLimiter(down_client, prefix="x:", window_s=1)
    limiter.breaker.cooldown_s = 3600.0
    calls = []
    script = limiter._check
    limiter._check = lambda **kw: calls.append(1) or script(**kw)
    results = [limiter.check("t", rpm=1, tpm=0) for _ in range(50)]
    assert all(r.allowed and r.degraded for r in results)
    assert limiter.redis_errors == 50 and len(calls) == 1
    limiter.breaker.cooldown_s = 0.0
    limiter.breaker.failure()  # a cool-down of zero has ended at once: the next check asks Redis again
    assert limiter.check("t", rpm=1, tpm=0).degraded and len(calls) == 2


def test_redis_outage_unknown_key_is_503_not_401(down_client):
    store = TenantStore(down_client, prefix="x:", cache_s=0)
    with TestClient(build_gateway_app(FakeBackend(), store, None, None, ServiceMetrics(), AppConfig())) as c:
        r = c.post("/v1/completions", json=BODY, headers=auth("sk-knnssd-someone"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        assert c.get("/health").status_code == 200


def test_tenant_cache_rides_out_an_outage(rclient, redis_prefix):
    store = TenantStore(rclient, prefix=redis_prefix, cache_s=0.2)
    _, key = store.add("cached")
    assert store.authenticate(key).name == "cached"
    store.redis = AppConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0").redis_client()
    store._lookup = store.redis.register_script("return false")
    try:
        time.sleep(0.25)  # expired, and Redis is gone: the stale entry still answers
        assert store.authenticate(key).name == "cached"
        assert store.redis_errors == 1
    finally:
        store.redis.close()
