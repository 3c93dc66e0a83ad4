"""The gateway app over a small fake backend: OpenAI shapes, SSE format, usage chunk, errors and auth."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from router.route import routing_text
from services.backend import Backend, BackendChunk, BackendRequest, RouteInfo, Usage
from services.config import AppConfig, GenerationConfig, HttpConfig
from services.gateway import build_gateway_app
from services.metrics import ServiceMetrics
from services.tenants import Tenant, TenantStore
from tests.fake_backend import MODEL, RecordingBackend


class TooLong(ValueError):
    """Shaped like engine.decode.PromptTooLongError as it arrives across a process boundary."""

    def __init__(self, prompt_tokens: int, limit: int):
        self.prompt_tokens, self.limit = prompt_tokens, limit
        super().__init__("too long")


class BackPressureError(Exception):
    """Named like Ray Serve's: the gateway maps it to 503 without importing Ray."""


class FakeBackend(RecordingBackend):
    """Replies with the words of REPLY one token at a time; magic prompts raise the errors under test."""

    REPLY = "Hello there from the fake model ."

    async def stream(self, req: BackendRequest):
        self.requests.append(req)
        text = routing_text(req.prompt, req.messages)
        if "TOO_LONG" in text:
            raise TooLong(5000, 1024)
        if "BUSY" in text:
            raise BackPressureError("queue full")
        if "CRASH" in text:
            raise RuntimeError("boom")
        words = self.REPLY.split(" ")[: req.sampling.max_new_tokens]
        # the backend decides plain decoding and its route says so (services.backend)
        route = (RouteInfo(domain="chat", config_id="ssd-abc", index_version=3, cache_hit=True) if req.speculative
                 else RouteInfo(config_id="plain"))
        n_prompt = len(text.split())
        for i, w in enumerate(words):
            if "MIDSTREAM" in text and i == 2:
                raise RuntimeError("died mid-stream")
            last = i == len(words) - 1
            yield BackendChunk(
                text=("" if i == 0 else " ") + w,
                tokens=1,
                route=route if (i == 0 or last) else None,
                usage=Usage(n_prompt, len(words)) if (i == 0 or last) else None,
                finish_reason=("length" if len(words) < 7 else "stop") if last else None,
                stats={"drafted": 8, "accepted": 6, "steps": 3, "acceptance_rate": 0.75} if last else None,
                replica="replica-0" if last else None,
                queue_depth=1 if last else None,
            )


@pytest.fixture
def keys():
    alice, alice_key = Tenant.create("alice")
    bob, bob_key = Tenant.create("bob", index_version="v7")
    ops, ops_key = Tenant.create("ops", admin=True)
    return {"alice": (alice, alice_key), "bob": (bob, bob_key), "ops": (ops, ops_key)}


@pytest.fixture
def fake():
    return FakeBackend()


@pytest.fixture
def metrics():
    return ServiceMetrics()


@pytest.fixture
def client(keys, fake, metrics):
    config = AppConfig(http=HttpConfig(max_body_bytes=4096), generation=GenerationConfig(max_tokens_limit=64))
    store = TenantStore(None, tenants=[t for t, _ in keys.values()])
    app = build_gateway_app(fake, store, None, None, metrics, config)
    with TestClient(app) as c:
        c.headers["authorization"] = f"Bearer {keys['alice'][1]}"
        yield c


def envelope(r) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def sse_events(text: str) -> list:
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    out = []
    for e in events:
        assert e.startswith("data: "), e
        payload = e[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_the_fake_has_the_real_backends_shape(fake):
    """The tests below stand in FakeBackend for the service's own backend (services.ray_backend.RayBackend):
    both satisfy the gateway's Backend protocol with the same call shapes, an async generator taking one
    BackendRequest and a plain `models()`, so what the gateway is tested against is what it meets."""
    import inspect

    from services.ray_backend import RayBackend

    for cls in (RayBackend, FakeBackend):
        assert inspect.isasyncgenfunction(cls.stream), cls
        assert list(inspect.signature(cls.stream).parameters) == ["self", "req"], cls
        assert not inspect.iscoroutinefunction(cls.models)
        assert list(inspect.signature(cls.models).parameters) == ["self"]
    assert isinstance(RayBackend(replica=None, models=[MODEL]), Backend) and isinstance(fake, Backend)


def test_completion(client, fake):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Say hi", "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == FakeBackend.REPLY
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}
    k = body["knnssd"]
    assert (k["domain"], k["config_id"], k["index_version"], k["speculative"]) == ("chat", "ssd-abc", "3", True)
    assert k["acceptance_rate"] == 0.75 and k["stats"]["drafted"] == 8
    assert r.headers["x-knnssd-domain"] == "chat"
    assert r.headers["x-knnssd-config-id"] == "ssd-abc"
    assert r.headers["x-knnssd-acceptance"] == "0.7500"
    req = fake.requests[-1]
    assert req.prompt == "Say hi" and req.sampling.max_new_tokens == 10 and req.sampling.greedy
    assert req.tenant == "alice" and req.index_version is None


def test_sampling_params_and_extensions_reach_backend(client, fake, keys):
    client.headers["authorization"] = f"Bearer {keys['bob'][1]}"
    r = client.post("/v1/completions", json={
        "model": MODEL, "prompt": ["only one"], "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
        "seed": 42, "stop": "\n", "n": 1, "speculative": False, "user": "u1",
    })
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["knnssd"]["config_id"] == "plain" and r.json()["knnssd"]["speculative"] is False
    req = fake.requests[-1]
    s = req.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (3, 0.7, 0.9, 5, 42, ("\n",))
    assert req.speculative is False and req.prompt == "only one"
    assert req.tenant == "bob" and req.index_version == "v7"  # the tenant's pin travels with the request


def test_chat(client, fake):
    r = client.post("/v1/chat/completions", json={
        "model": MODEL,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
        ],
        "max_completion_tokens": 20,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": FakeBackend.REPLY, "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 7
    req = fake.requests[-1]
    assert req.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert req.sampling.max_new_tokens == 20 and req.sampling.temperature == 1.0  # OpenAI's default temperature


def test_default_max_tokens_from_config(client, fake):
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 200
    assert fake.requests[-1].sampling.max_new_tokens == 64  # the default (128), capped by max_tokens_limit


@pytest.mark.parametrize("include_usage", [True, False])
def test_completion_stream(client, include_usage):
    body = {"model": MODEL, "prompt": "Say hi", "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-knnssd-domain"] == "chat"  # known before decoding: sent as a header
        text = r.read().decode()
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    content = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None]
    assert "".join(c["choices"][0]["text"] for c in content) == FakeBackend.REPLY
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "stop"
    assert finish[0]["knnssd"]["acceptance_rate"] == 0.75
    usage = [c for c in chunks if "usage" in c]
    if include_usage:
        assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0]["choices"] == []
        assert usage[0]["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}
    else:
        assert usage == []


def test_chat_stream(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == FakeBackend.REPLY
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8


def test_error_after_stream_started_is_sent_in_band(client):
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "MIDSTREAM", "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r.read().decode())
    assert "[DONE]" not in events
    assert events[-1]["error"]["type"] == "server_error"
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "still fine"}).status_code == 200


BIG = "x" * 5000

# (description, path, body (dict, or raw str), status, param, code)
BAD_INPUTS = [
    ("malformed JSON", "/v1/completions", '{"model": "smollm2", "prompt": ', 400, None, "invalid_json"),
    ("empty body", "/v1/completions", "", 400, None, "invalid_json"),
    ("body not an object", "/v1/completions", "[1, 2]", 400, None, "invalid_body"),
    ("NaN is not JSON", "/v1/completions", '{"model": "smollm2", "prompt": "x", "temperature": NaN}', 400, None,
     "invalid_json"),
    ("missing model", "/v1/completions", {"prompt": "x"}, 400, "model", "missing_required_parameter"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    ("prompt wrong type", "/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt", "invalid_value"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", "invalid_value"),
    ("batched prompts", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
    ("token-id prompt", "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}, 400, "prompt", "invalid_value"),
    ("max_tokens zero", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens",
     "invalid_value"),
    ("max_tokens as string", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "10"}, 400,
     "max_tokens", "invalid_value"),
    ("max_tokens above cap", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 65}, 400,
     "max_tokens", "invalid_value"),
    ("temperature > 2", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 2.5}, 400, "temperature",
     "invalid_value"),
    ("top_p zero", "/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("top_k negative", "/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -1}, 400, "top_k",
     "invalid_value"),
    ("seed float", "/v1/completions", {"model": MODEL, "prompt": "x", "seed": 1.5}, 400, "seed", "invalid_value"),
    ("stream as string", "/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream",
     "invalid_value"),
    ("n > 1", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 3}, 400, "n", "unsupported_parameter"),
    ("five stop strings", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": list("abcde")}, 400, "stop",
     "invalid_value"),
    ("logprobs", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 5}, 400, "logprobs",
     "unsupported_parameter"),
    ("best_of", "/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("unknown argument", "/v1/completions", {"model": MODEL, "prompt": "x", "foo": 1}, 400, "foo",
     "unknown_parameter"),
    ("stream_options without stream", "/v1/completions",
     {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "invalid_value"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model", "model_not_found"),
    ("prompt too long", "/v1/completions", {"model": MODEL, "prompt": "TOO_LONG"}, 400, "prompt",
     "context_length_exceeded"),
    ("body too large", "/v1/completions", {"model": MODEL, "prompt": BIG}, 413, None, "payload_too_large"),
    ("no replica", "/v1/completions", {"model": MODEL, "prompt": "BUSY"}, 503, None, "service_unavailable"),
    ("backend crash", "/v1/completions", {"model": MODEL, "prompt": "CRASH"}, 500, None, "internal_error"),
    ("streaming prompt too long", "/v1/completions", {"model": MODEL, "prompt": "TOO_LONG", "stream": True}, 400,
     "prompt", "context_length_exceeded"),
    ("chat: no messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages",
     "invalid_value"),
    ("chat: tool role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
     400, "messages[0].role", "invalid_value"),
    ("chat: image part", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     400, "messages[0].content", "invalid_value"),
    ("chat: tools", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "tools", "unsupported_parameter"),
    ("chat: messages not a list", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages",
     "invalid_value"),
]


def test_bad_inputs_table(client):
    assert len(BAD_INPUTS) >= 15
    good = {"model": MODEL, "prompt": "good request", "max_tokens": 4}
    for desc, path, body, status, param, code in BAD_INPUTS:
        if isinstance(body, str):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = client.post(path, json=body)
        assert r.status_code == status, (desc, r.status_code, r.text)
        err = envelope(r)
        assert err["param"] == param, (desc, err)
        if code is not None:
            assert err["code"] == code, (desc, err)
        assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error"), (desc, err)
        # and the service keeps serving after each of them
        ok = client.post("/v1/completions", json=good)
        assert ok.status_code == 200, (desc, ok.text)


def test_auth(client, keys):
    body = {"model": MODEL, "prompt": "x"}
    for headers in ({"authorization": ""}, {"authorization": "Bearer "}, {"authorization": "Basic abc"},
                    {"authorization": "Bearer sk-knnssd-wrong"}, {"authorization": "Bearer " + keys["alice"][1] + "x"}):
        r = client.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert envelope(r)["code"] in ("invalid_api_key", "missing_api_key")
    r = client.get("/v1/models", headers={"authorization": "Bearer nope"})
    assert r.status_code == 401
    # auth comes before the body is even parsed
    r = client.post("/v1/completions", content="{not json", headers={"authorization": "Bearer nope"})
    assert r.status_code == 401


def test_body_limit_without_content_length(client):
    def chunks():
        yield b'{"model": "smollm2", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert envelope(r)["code"] == "payload_too_large"


def test_form_content_type_is_refused(client):
    """curl -d without -H 'Content-Type: application/json' sends form encoding: 415, not a guess (issue 22;
    tests/unit/test_strict_body.py has the rest)."""
    r = client.post("/v1/completions", content=json.dumps({"model": MODEL, "prompt": "x"}),
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and envelope(r)["code"] == "unsupported_media_type", r.text


def test_models_health_and_unknown_routes(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert r.json() == {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "knnssd"}]}
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/nope").status_code == 404
    assert client.get("/health", headers={"authorization": ""}).json()["status"] == "ok"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and envelope(r)["code"] == "not_found"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and envelope(r)["code"] == "method_not_allowed"


def test_usage_endpoint_disabled_without_store(client):
    assert client.get("/v1/usage").status_code == 404


def test_metrics_endpoint(client, metrics, keys):
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2})
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, headers={"authorization": "Bearer bad"})
    r = client.get("/metrics", headers={"authorization": f"Bearer {keys['ops'][1]}"})  # an admin tenant's key
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'knnssd_http_requests_total{endpoint="/v1/completions",status="200",tenant="alice"} 1.0' in text
    assert 'knnssd_http_requests_total{endpoint="/v1/completions",status="400",tenant="alice"} 1.0' in text
    assert 'knnssd_http_requests_total{endpoint="/v1/completions",status="401",tenant="-"} 1.0' in text
    assert metrics.value("knnssd_spec_decode_draft_tokens_total", {"domain": "chat", "config_id": "ssd-abc"}) == 8
    assert metrics.value("knnssd_spec_decode_accepted_tokens_total", {"domain": "chat", "config_id": "ssd-abc"}) == 6
    assert metrics.value("knnssd_route_cache_total", {"result": "hit"}) == 1
    assert metrics.value("knnssd_replica_queue_depth", {"replica": "replica-0"}) == 1
    assert metrics.value("knnssd_time_to_first_token_seconds_count", {"endpoint": "/v1/completions"}) == 1
    assert metrics.value("knnssd_time_per_output_token_seconds_count", {"endpoint": "/v1/completions"}) == 1
    assert metrics.value("knnssd_generation_tokens_total", {"tenant": "alice"}) == 7
    assert metrics.value("knnssd_requests_in_flight") == 0
