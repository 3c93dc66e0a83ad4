"""Fast checks of the hardening pieces (issue 13) without Ray: error mapping across processes, the proxy's
envelope middleware, uvicorn's own 400s (real sockets), disconnects in metrics, index validation against
the served model, tenant ids. The same behaviours are tested end to end in tests/integration/test_hardening_*.py.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import socket

import pytest
from fastapi.testclient import TestClient

from engine.config import DraftConfig
from services.config import AppConfig
from services.errors import (
    EnvelopeMiddleware,
    ServiceUnavailable,
    patch_uvicorn_400,
    to_service_error,
)
from services.gateway import build_gateway_app, check_json_values
from services.metrics import HttpMetricsMiddleware, ServiceMetrics
from services.tenants import Tenant, TenantStore
from tests.netutil import uvicorn_thread


class BackPressureError(Exception):
    """Shaped like Ray Serve's (private `_retry_after_s`)."""

    def __init__(self, retry_after_s):
        super().__init__("queue full")
        self._retry_after_s = retry_after_s


class ActorDiedError(Exception):
    """Named like Ray's: the replica process is gone."""


def test_a_full_queue_and_a_dead_replica_map_to_503_with_retry_after():
    busy = to_service_error(BackPressureError(2.5))
    assert busy.status == 503 and busy.headers["retry-after"] == "3" and busy.headers["retry-after-ms"] == "2500"
    gone = to_service_error(ActorDiedError("killed"))
    assert gone.status == 503 and gone.code == "replica_unavailable" and int(gone.headers["retry-after"]) >= 1


def test_service_unavailable_keeps_retry_after_across_processes():
    err = pickle.loads(pickle.dumps(ServiceUnavailable("queue full", retry_after_s=7)))
    assert isinstance(err, ServiceUnavailable) and err.retry_after_s == 7
    assert err.response().status_code == 503 and err.headers["retry-after"] == "7"

    class Wrapped(Exception):  # how Ray hands a remote error over: the original as `.cause`
        cause = err

    assert to_service_error(Wrapped()) is err


def _call(app, scope_path="/x"):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(m):
        sent.append(m)

    asyncio.run(app({"type": "http", "method": "GET", "path": scope_path, "headers": []}, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def test_the_proxy_middleware_puts_plain_errors_in_the_envelope():
    async def plain_503(scope, receive, send):
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"4")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure", "more_body": True})
        await send({"type": "http.response.body", "body": b".", "more_body": False})

    status, headers, body = _call(EnvelopeMiddleware(plain_503))
    err = json.loads(body)["error"]
    assert status == 503 and headers[b"retry-after"] == b"4" and headers[b"content-type"] == b"application/json"
    assert err["code"] == "service_unavailable" and "backpressure" in err["message"]

    async def silent(scope, receive, send):  # e.g. the gateway replica died under the request
        return None

    status, headers, body = _call(EnvelopeMiddleware(silent))
    assert status == 503 and json.loads(body)["error"]["type"] == "server_error" and headers[b"retry-after"]

    async def json_404(scope, receive, send):  # the gateway's own answers pass untouched
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {"x": 1}}'})

    assert _call(EnvelopeMiddleware(json_404))[2] == b'{"error": {"x": 1}}'


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_uvicorns_own_400s_carry_the_envelope(http):
    patch_uvicorn_400()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with uvicorn_thread(app, http=http, log_level="critical") as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
        assert json.loads(body)["error"]["code"] == "invalid_http"


def test_a_client_that_leaves_is_counted_as_499_not_500():
    metrics = ServiceMetrics()

    async def cancelled(scope, receive, send):
        raise asyncio.CancelledError

    mw = HttpMetricsMiddleware(cancelled, metrics=metrics)
    with pytest.raises(asyncio.CancelledError):
        _call(mw, "/v1/completions")
    labels = {"endpoint": "/v1/completions", "tenant": "-"}
    assert metrics.value("knnssd_http_requests_total", {**labels, "status": "499"}) == 1
    assert metrics.value("knnssd_http_requests_total", {**labels, "status": "500"}) == 0


def test_deep_json_and_lone_surrogates_are_refused_naming_where():
    with pytest.raises(Exception) as deep:
        check_json_values({"prompt": "x", "user": json.loads("[" * 40 + "]" * 40)})
    assert deep.value.param == "user" and "nested too deeply" in deep.value.message
    with pytest.raises(Exception) as sur:
        check_json_values({"messages": [{"role": "user", "content": "a\ud800"}]})
    assert sur.value.param == "messages[0].content" and sur.value.status == 400
    check_json_values({"prompt": "emoji \U0001f600 is a proper pair"})  # paired surrogates decode to one char


def test_openapi_has_request_bodies_and_error_statuses():
    t, key = Tenant.create("a")

    class Backend:
        def models(self):
            return ["smollm2"]

        async def stream(self, req):  # pragma: no cover - not called
            yield None

    app = build_gateway_app(Backend(), TenantStore(None, tenants=[t]), None, None, ServiceMetrics(), AppConfig())
    doc = TestClient(app).get("/openapi.json").json()
    op = doc["paths"]["/v1/chat/completions"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert "422" not in json.dumps(doc["paths"]) and {"400", "429", "503"} <= set(op["responses"])


def test_index_validation_against_the_served_model(tmp_path):
    from router.reload import IncompatibleArtefact, ModelSpec

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 18, "vocab_size": 262144}}))
    spec = ModelSpec.from_model_dir(tmp_path)
    assert spec == ModelSpec(num_layers=18, vocab_size=262144)
    assert DraftConfig(skip_mlp=(17,)).problems(spec.num_layers, spec.vocab_size) == []
    assert DraftConfig(skip_mlp=(18, 999)).problems(spec.num_layers, spec.vocab_size)[0][0] == "layers"
    assert DraftConfig(draft_vocab=300_000).problems(spec.num_layers, spec.vocab_size)[0][0] == "vocab"
    assert DraftConfig(model_draft=False).problems(spec.num_layers, spec.vocab_size)[0][0] == "config"
    assert DraftConfig.plain().problems(spec.num_layers, spec.vocab_size) == []
    assert IncompatibleArtefact("layers", "x").reason == "layers"


def test_tenant_ids_are_fresh_for_new_tenants_and_stable_for_stored_ones():
    a, _ = Tenant.create("same")
    b, _ = Tenant.create("same")
    assert a.id != b.id
    legacy = json.loads(a.model_dump_json())
    del legacy["id"]  # stored before ids existed
    assert Tenant.model_validate(legacy).id == Tenant.model_validate(legacy).id
    assert Tenant.model_validate(legacy).id != Tenant.model_validate({**legacy, "created_at": 1.0}).id
