"""Issue 22, smaller points: a strict server. A body not declared as JSON is refused with 415, one that is not
UTF-8 (UTF-16, a byte order mark) or that names a key twice with 400, all in the OpenAI envelope, before any
model work; and the official `openai` client (it sends `application/json`) still works, over real HTTP."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from services.backend import BackendChunk, BackendRequest, RouteInfo, Usage
from services.config import AppConfig
from services.gateway import build_gateway_app
from services.metrics import ServiceMetrics
from services.tenants import Tenant, TenantStore
from tests.fake_backend import MODEL, RecordingBackend
from tests.netutil import uvicorn_thread

BODY = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode()


class OkBackend(RecordingBackend):
    async def stream(self, req: BackendRequest):
        self.requests.append(req)
        yield BackendChunk(text="ok", tokens=1, usage=Usage(1, 1), finish_reason="stop", route=RouteInfo(config_id="plain"),
                           stats={"drafted": 0, "accepted": 0, "steps": 1})


@pytest.fixture
def gateway():
    tenant, key = Tenant.create("alice")
    store = TenantStore(None, tenants=[tenant])
    backend = OkBackend()
    app = build_gateway_app(backend, store, None, None, ServiceMetrics(), AppConfig())
    return app, backend, {"authorization": f"Bearer {key}"}, key


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


@pytest.mark.parametrize("content_type", [
    None,
    "application/x-www-form-urlencoded",  # what `curl -d` sends without -H
    "text/plain",
    "text/plain; charset=utf-8",
    "multipart/form-data; boundary=xyz",
    "application/xml",
    "application/jsonx",
    "application/json; charset=utf-16",
    "application/json; charset=latin-1",
])
def test_a_body_not_declared_as_json_is_refused_with_415(gateway, content_type):
    app, backend, auth, _ = gateway
    headers = dict(auth) if content_type is None else {**auth, "content-type": content_type}
    with TestClient(app) as client:
        r = client.post("/v1/completions", content=BODY, headers=headers)
    err = _error(r, 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    assert backend.requests == []  # refused before any model work


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON; charset=\"UTF-8\"", "application/json;charset=utf8"])
def test_json_with_or_without_a_utf8_charset_is_accepted(gateway, content_type):
    app, _, auth, _ = gateway
    with TestClient(app) as client:
        r = client.post("/v1/completions", content=BODY, headers={**auth, "content-type": content_type})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("desc, body, needle", [
    ("utf-8-bom", b"\xef\xbb\xbf" + BODY, "byte order mark"),
    ("utf-16-le-bom", b"\xff\xfe" + BODY.decode().encode("utf-16-le"), "UTF-16"),
    ("utf-16-be-bom", b"\xfe\xff" + BODY.decode().encode("utf-16-be"), "UTF-16"),
    ("utf-16-le", BODY.decode().encode("utf-16-le"), "UTF-16"),
    ("utf-32", BODY.decode().encode("utf-32"), "UTF-16"),
])
def test_a_body_that_is_not_utf8_is_refused_with_400(gateway, desc, body, needle):
    app, backend, auth, _ = gateway
    with TestClient(app) as client:
        r = client.post("/v1/completions", content=body, headers={**auth, "content-type": "application/json"})
    err = _error(r, 400, "invalid_json")
    assert needle in err["message"], (desc, err)
    assert backend.requests == []


@pytest.mark.parametrize("desc, body, key", [
    ("model-twice", '{"model": "gpt-4", "model": "smollm2", "prompt": "x"}', "model"),
    ("same-value-twice", '{"model": "smollm2", "prompt": "x", "prompt": "x"}', "prompt"),
    ("nested", '{"model": "smollm2", "messages": [{"role": "user", "role": "system", "content": "x"}]}', "role"),
    ("escaped-spelling", '{"model": "smollm2", "prompt": "x", "mod\\u0065l": "gpt-4"}', "model"),
])
def test_a_key_sent_twice_is_refused_with_400(gateway, desc, body, key):
    app, backend, auth, _ = gateway
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with TestClient(app) as client:
        r = client.post(path, content=body.encode(), headers={**auth, "content-type": "application/json"})
    err = _error(r, 400, "duplicate_key")
    assert f"'{key}'" in err["message"], (desc, err)
    assert backend.requests == []


def test_the_content_type_is_checked_after_the_key(gateway):
    app, _, _, _ = gateway
    with TestClient(app) as client:
        r = client.post("/v1/completions", content=BODY, headers={"content-type": "text/plain"})
    _error(r, 401, "missing_api_key")


def test_415_is_in_the_openapi_document(gateway):
    app, _, _, _ = gateway
    doc = app.openapi()
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert "415" in doc["paths"][path]["post"]["responses"]


def test_the_official_openai_client_is_served_by_the_strict_server(gateway):
    """Real HTTP, the unchanged client: it declares application/json, so nothing it sends is refused."""
    app, backend, _, key = gateway
    with uvicorn_thread(app) as port, openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=10) as client:
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text == "ok"
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=2, extra_body={"speculative": False})
        assert chat.choices[0].message.content == "ok"
        streamed = list(client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True))
        assert "".join(c.choices[0].text for c in streamed if c.choices) == "ok"
        assert len(backend.requests) == 3
