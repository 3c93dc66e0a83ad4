"""The official `openai` client, unchanged, against the gateway served by uvicorn on a free localhost port
(fake backend; tenants, limits and usage in the real Redis)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from router.route import routing_text
from services.backend import BackendChunk, BackendRequest, RouteInfo, Usage
from services.config import AppConfig, HttpConfig, LimitsConfig
from services.gateway import build_gateway_app
from services.limits import RateLimiter
from services.metrics import ServiceMetrics
from services.tenants import TenantStore
from services.usage import UsageStore
from tests.netutil import uvicorn_thread
from tests.timing import Window, with_growing_window

MODEL = "smollm2"


class EchoBackend:
    """Echoes the routing text back word by word; records what it was asked."""

    def __init__(self) -> None:
        self.last: BackendRequest | None = None

    def models(self) -> list[str]:
        return [MODEL]

    async def stream(self, req: BackendRequest):
        self.last = req
        words = routing_text(req.prompt, req.messages).split()[: req.sampling.max_new_tokens]
        route = RouteInfo(domain="chat", config_id="ssd-echo", index_version="9") if req.speculative else RouteInfo(
            config_id="plain")  # the backend decides plain decoding and its route says so (services.backend)
        for i, w in enumerate(words):
            last = i == len(words) - 1
            if "slow" in words:
                await asyncio.sleep(0.05)
            yield BackendChunk(
                text=w if i == 0 else " " + w, tokens=1, route=route if i == 0 or last else None,
                usage=Usage(len(words), len(words)) if last else None,
                finish_reason="stop" if last else None,
                stats={"drafted": 4, "accepted": 4, "steps": 1, "acceptance_rate": 1.0} if last else None,
            )


@pytest.fixture
def server(redis_url, redis_prefix):
    # /metrics without a key here (the admin-key gate is tested in test_hardening_gateway.py)
    config = AppConfig(redis_url=redis_url, limits=LimitsConfig(window_s=1.0), http=HttpConfig(metrics_public=True))
    rc = config.redis_client()
    store = TenantStore(rc, prefix=redis_prefix)
    _, key = store.add("oa", rpm=20, tpm=0)
    _, tight_key = store.add("tight", rpm=1, tpm=0)
    backend = EchoBackend()
    limiter = RateLimiter(rc, redis_prefix, window_s=1.0)
    app = build_gateway_app(backend, store, limiter, UsageStore(rc, redis_prefix), ServiceMetrics(), config)
    with uvicorn_thread(app) as port:
        yield f"http://127.0.0.1:{port}", key, tight_key, backend, store, limiter
    rc.close()


@pytest.fixture
def oa(server):
    url, key, *_ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)
    yield client
    client.close()


def test_completions_and_chat(oa, server):
    backend = server[3]
    r = oa.completions.create(model=MODEL, prompt="one two three", max_tokens=5, temperature=0)
    assert r.choices[0].text == "one two three" and r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == 6
    assert r.model_extra["knnssd"]["config_id"] == "ssd-echo"

    c = oa.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "hello world"}],
        max_tokens=10, seed=3, extra_body={"speculative": False, "top_k": 4},
    )
    assert c.choices[0].message.content == "hello world" and c.choices[0].message.role == "assistant"
    assert c.model_extra["knnssd"]["config_id"] == "plain"
    assert backend.last.speculative is False and backend.last.sampling.top_k == 4 and backend.last.sampling.seed == 3

    raw = oa.completions.with_raw_response.create(model=MODEL, prompt="hi there", max_tokens=2)
    assert raw.headers["x-knnssd-domain"] == "chat" and raw.headers["x-knnssd-acceptance"] == "1.0000"
    assert raw.headers["x-ratelimit-limit-requests"] == "20"
    assert [m.id for m in oa.models.list()] == [MODEL]


def test_streaming_with_usage(oa):
    chunks = list(oa.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a b c d"}], stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "a b c d"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4

    comp = list(oa.completions.create(model=MODEL, prompt="x y", stream=True))
    assert "".join(ch.choices[0].text for ch in comp if ch.choices) == "x y"


def test_errors_map_to_openai_exceptions(oa, server):
    url, _, tight_key, _, store, limiter = server
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="gpt-nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as bad:
        oa.completions.create(model=MODEL, prompt="x", n=2)
    assert bad.value.param == "n" and bad.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=9)
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-knnssd-wrong", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    finally:
        wrong.close()

    def rate_limited(window_s: float) -> str:
        """rpm=1: a second request inside the window is a RateLimitError; after Retry-After it passes."""
        limiter.window_ms = int(window_s * 1000)  # the gateway's window for this attempt (1 s first)
        key = tight_key if window_s == 1.0 else store.add(f"tight-{window_s:g}", rpm=1, tpm=0)[1]
        tight = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        try:
            w = Window(window_s)
            tight.completions.create(model=MODEL, prompt="x")
            try:
                tight.completions.create(model=MODEL, prompt="x")
                w.expect(False, "the second request inside the window was admitted")
            except openai.RateLimitError as limited:
                wait_ms = int(limited.response.headers["retry-after-ms"])
            time.sleep(wait_ms / 1000 + 0.05)
            assert tight.completions.create(model=MODEL, prompt="back").choices[0].text == "back"
        finally:
            tight.close()
        return key

    tight_key = with_growing_window(rate_limited)
    # usage, metrics and health over plain HTTP
    with httpx.Client(base_url=url) as h:
        usage = h.get("/v1/usage", headers={"authorization": f"Bearer {tight_key}"}).json()
        assert usage["tenant"] == "tight" and usage["total"]["requests"] == 2
        assert "knnssd_rate_limited_total" in h.get("/metrics").text
        assert h.get("/health").json()["status"] == "ok"


def test_aborted_stream_is_still_accounted(server):
    url, key, *_ = server
    prompt = "slow " + " ".join(["w"] * 40)
    hdr = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=10) as h:
        with h.stream("POST", "/v1/completions", headers=hdr,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 41, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up
        deadline = time.monotonic() + 5
        while True:
            total = h.get("/v1/usage", headers=hdr).json()["total"]
            if total["requests"] == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert total["requests"] == 1 and 0 < total["completion_tokens"] < 41
        metrics = h.get("/metrics").text
    assert "knnssd_requests_in_flight 0.0" in metrics
