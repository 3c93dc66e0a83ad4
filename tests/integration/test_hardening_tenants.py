"""Tenancy hardening (issue 13, finding 7) on real Redis and real sockets: gateways served by uvicorn over
a fake backend, tenants managed by the real `knnssd tenants` CLI.

- a removal applies at once on every gateway (pub/sub), not after the cache time;
- a removed key stays denied while Redis is down (local deny-list), known keys keep working, unknown get 503;
- a name added again is a new tenant (fresh id): its rate window and usage start empty.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import httpx
import pytest
import redis
from typer.testing import CliRunner

from services.backend import BackendChunk, BackendRequest, RouteInfo, Usage
from services.config import AppConfig, LimitsConfig
from services.gateway import build_gateway_app
from services.limits import RateLimiter
from services.metrics import ServiceMetrics
from router.redis_server import start_redis_server
from services.tenants import TenantStore
from deploy.tenants_cli import tenants_app
from services.usage import UsageStore
from tests.netutil import uvicorn_thread

MODEL = "smollm2"
BODY = {"model": MODEL, "prompt": "two words", "max_tokens": 4}


class FakeBackend:
    def models(self) -> list[str]:
        return [MODEL]

    async def stream(self, req: BackendRequest):
        yield BackendChunk(text="ok", tokens=1, route=RouteInfo(domain="chat", config_id="ssd-x", index_version="1"),
                           usage=Usage(2, 1), finish_reason="stop", stats={"drafted": 0, "accepted": 0, "steps": 1})


class Gateway:
    """One gateway replica: its own Redis client, TenantStore (watching events), limiter and usage, on uvicorn."""

    def __init__(self, redis_url: str, prefix: str, cache_s: float, rpm: int = 0) -> None:
        self.config = AppConfig(redis_url=redis_url, limits=LimitsConfig(window_s=60.0, default_rpm=rpm))
        self.client = self.config.redis_client()
        self.store = TenantStore(self.client, prefix=prefix, cache_s=cache_s).watch()
        app = build_gateway_app(FakeBackend(), self.store, RateLimiter(self.client, prefix, window_s=60.0),
                                UsageStore(self.client, prefix), ServiceMetrics(), self.config)
        self._serving = ExitStack()
        self.port = self._serving.enter_context(uvicorn_thread(app))
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, key: str) -> httpx.Response:
        return httpx.post(self.url + "/v1/completions", json=BODY, headers={"authorization": f"Bearer {key}"},
                          timeout=10)

    def close(self) -> None:
        self._serving.close()
        self.store.close()
        self.client.close()


def cli(redis_url: str, prefix: str, *args: str) -> str:
    res = CliRunner().invoke(tenants_app, [*args, "--redis-url", redis_url, "--prefix", prefix])
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture
def gateways(redis_url, redis_prefix):
    made: list[Gateway] = []

    def make(**kw) -> Gateway:
        gw = Gateway(redis_url, redis_prefix, **kw)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


def wait_for(predicate, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.01)
    return time.monotonic() - t0


def test_a_removal_applies_at_once_on_every_gateway(redis_url, redis_prefix, gateways):
    """Both gateways cached the key for 5 minutes, so a refusal within the wait below (30 s at most, usually
    milliseconds: printed) can only come from the removal message (pub/sub), not from a cache expiring."""
    a, b = gateways(cache_s=300.0), gateways(cache_s=300.0)  # caches that would trust the key for 5 minutes
    key = cli(redis_url, redis_prefix, "add", "leaver")
    assert a.post(key).status_code == 200 and b.post(key).status_code == 200  # both gateways cached it
    cli(redis_url, redis_prefix, "remove", "leaver")
    took = max(wait_for(lambda: a.post(key).status_code == 401, timeout=30.0),
               wait_for(lambda: b.post(key).status_code == 401, timeout=30.0))
    print(f"\nremoval effective on both gateways within {took:.3f} s of `knnssd tenants remove`")


def test_removed_keys_stay_denied_while_redis_is_down(redis_prefix):
    url, proc = start_redis_server()  # our own Redis, to stop it (the shared one stays up)
    gw = Gateway(url, redis_prefix, cache_s=0.0)  # cache_s 0: every request asks Redis while it is up
    try:
        admin = redis.Redis.from_url(url)
        store = TenantStore(admin, prefix=redis_prefix)
        _, stay = store.add("stay")
        _, leave = store.add("leave")
        assert gw.post(stay).status_code == 200 and gw.post(leave).status_code == 200
        store.remove("leave")
        wait_for(lambda: gw.post(leave).status_code == 401)
        admin.close()
        proc.terminate()
        proc.wait(timeout=10)
        for _ in range(3):  # Redis is gone: the removed key stays out, the known one works, unknown is 503
            assert gw.post(leave).status_code == 401
            assert gw.post(stay).status_code == 200
            r = gw.post("sk-knnssd-never-seen")
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
            assert int(r.headers["retry-after"]) >= 1
    finally:
        gw.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def test_a_name_added_again_is_a_new_tenant(redis_url, redis_prefix, gateways):
    gw = gateways(cache_s=10.0, rpm=1)
    old_key = cli(redis_url, redis_prefix, "add", "again", "--rpm", "1")
    assert gw.post(old_key).status_code == 200
    assert gw.post(old_key).status_code == 429  # its one request per minute is used
    usage = httpx.get(gw.url + "/v1/usage", headers={"authorization": f"Bearer {old_key}"}, timeout=10).json()
    assert usage["total"]["requests"] == 1
    old_id = gw.store.get("again").id
    cli(redis_url, redis_prefix, "remove", "again")
    new_key = cli(redis_url, redis_prefix, "add", "again", "--rpm", "1")
    assert gw.store.get("again").id != old_id
    r = gw.post(new_key)
    assert r.status_code == 200, r.text  # a fresh window, not the old tenant's
    usage = httpx.get(gw.url + "/v1/usage", headers={"authorization": f"Bearer {new_key}"}, timeout=10).json()
    assert usage["tenant"] == "again" and usage["total"]["requests"] == 1  # its own request only
    assert gw.post(old_key).status_code == 401
