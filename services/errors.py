"""Service errors: small classes carrying HTTP status and the OpenAI error fields, mapped to HTTP in one place.

Anything the gateway refuses is raised as a `ServiceError` subclass; `install_error_handlers(app)` is the
only code that turns errors (ours, FastAPI's validation errors, malformed JSON, routing 404/405, and any
unexpected exception) into the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`.
`to_service_error(exc)` maps exceptions raised on the model side (the engine's `PromptTooLongError`, Ray
Serve's back-pressure errors, errors wrapped by Ray) without importing the engine or Ray here.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base class: `status` is the HTTP status, `type`/`code`/`param` the OpenAI error fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def __reduce__(self):  # keep param/code/headers when pickled across Ray processes
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers, self.__dict__))

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status, headers=self.headers or None)


def _rebuild(cls, message, param, code, headers, state):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    err.message, err.param, err.code, err.headers = message, param, code, headers
    return err


class InvalidRequest(ServiceError):
    status, type, code = 400, "invalid_request_error", None


class PromptTooLong(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(ServiceError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class NotFound(ServiceError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(ServiceError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class PayloadTooLarge(ServiceError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """415: the body is not declared as JSON (form, text/plain, multipart, or a charset other than UTF-8)."""

    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class RateLimited(ServiceError):
    """429. `kind` is "requests" or "tokens" (OpenAI puts the exhausted limit in `type`)."""

    status, code = 429, "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str = "requests", retry_after_s: float = 1.0, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.type = kind
        self.retry_after_s = retry_after_s
        self.headers.setdefault("retry-after", str(max(1, math.ceil(retry_after_s))))
        self.headers.setdefault("retry-after-ms", str(max(1, math.ceil(retry_after_s * 1000))))


class Forbidden(ServiceError):
    status, type, code = 403, "invalid_request_error", "permission_denied"


class RequestTimeout(ServiceError):
    """408: the body did not arrive in time. The connection is closed, since the rest of a half-sent body
    would otherwise be read as the next request."""

    status, type, code = 408, "invalid_request_error", "body_timeout"

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.headers.setdefault("connection", "close")


class ClientClosed(ServiceError):
    """The client went away before its request was read; nobody reads this answer, metrics count it as 499."""

    status, type, code = 499, "invalid_request_error", "client_closed"


class InternalError(ServiceError):
    status, type, code = 500, "server_error", "internal_error"


class ServiceUnavailable(ServiceError):
    """503 with Retry-After: no replica can take the request now (queue full, replica restarting).

    Raise it from anywhere on the model side (a replica whose own queue is full, for one); it pickles with
    its `retry_after_s` across Ray processes and reaches the client as 503 + `Retry-After`."""

    status, type, code = 503, "server_error", "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s
        self.headers.setdefault("retry-after", str(max(1, math.ceil(retry_after_s))))
        self.headers.setdefault("retry-after-ms", str(max(1, math.ceil(retry_after_s * 1000))))


# Ray Serve raises these when no replica can take a request (queue full / deployment gone)...
_BUSY_NAMES = {"BackPressureError"}
# ...and Ray these when the replica died or cannot be reached (killed, node lost, restarting).
_GONE_NAMES = {
    "DeploymentUnavailableError", "ActorUnavailableError", "RayActorError", "ActorDiedError",
    "ActorUnschedulableError", "WorkerCrashedError", "NodeDiedError",
}
# A replica that died is restarted by Serve (model load included): a few seconds.
REPLICA_RESTART_RETRY_S = 5.0


def to_service_error(exc: BaseException) -> ServiceError | None:
    """Map an exception from the model side to a `ServiceError`, or None when it is unexpected (-> 500).

    Ray re-raises a deployment's exception as a `RayTaskError` whose `.cause` is the original, so the cause
    is looked at first. The engine's `PromptTooLongError` (a ValueError with `.prompt_tokens`/`.limit`) is
    recognised by class when the engine is loaded in this process, else by those attributes.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        mapped = to_service_error(cause)
        if mapped is not None:
            return mapped
    if isinstance(exc, ServiceError):
        return exc
    if _is_prompt_too_long(exc):
        tokens, limit = getattr(exc, "prompt_tokens", None), getattr(exc, "limit", None)
        msg = (
            f"This model's maximum context length is {limit} tokens, but the prompt has {tokens} tokens. "
            "Shorten the prompt."
            if tokens is not None and limit is not None
            else str(exc) or "The prompt is longer than the model's context."
        )
        return PromptTooLong(msg, param="prompt")
    names = {c.__name__ for c in type(exc).__mro__}
    if names & _BUSY_NAMES:
        retry = getattr(exc, "_retry_after_s", None) or getattr(exc, "retry_after_s", None) or 1.0
        return ServiceUnavailable("No model replica can take the request right now; retry shortly.",
                                  retry_after_s=float(retry))
    if names & _GONE_NAMES:
        return ServiceUnavailable("The model replica serving this request went away; retry shortly.",
                                  code="replica_unavailable", retry_after_s=REPLICA_RESTART_RETRY_S)
    return None


def _is_prompt_too_long(exc: BaseException) -> bool:
    # By class when the engine is already loaded in this process (never imported here: it pulls in torch),
    # else by shape: a ValueError carrying prompt_tokens and limit, which is what crosses a Ray boundary.
    cls = getattr(sys.modules.get("engine.decode"), "PromptTooLongError", None)
    if isinstance(cls, type) and isinstance(exc, cls):
        return True
    return isinstance(exc, ValueError) and hasattr(exc, "prompt_tokens") and hasattr(exc, "limit")


# custom error kinds (services.schemas) whose message already names the parameter
_SELF_EXPLAINING = {"stream_options_without_stream"}


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequest:
    """Turn pydantic/FastAPI validation errors into one 400 naming the offending parameter (OpenAI reports one)."""
    if not errors:
        return InvalidRequest("Invalid request.")
    err = errors[0]
    # A union (content: str | list[TextPart]) reports one error per branch; the deepest one is the branch the
    # client meant (a list whose part lacks 'text' is not "not a valid string").
    same_field = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(err.get("loc", ()))[:2]]
    err = max(same_field, key=lambda e: len(e.get("loc", ())))
    kind = err.get("type", "")
    loc = [p for p in err.get("loc", ()) if p != "body"]
    ctx = err.get("ctx") or {}
    param = ctx.get("param") or _param_from_loc(loc)
    if kind == "json_invalid":
        detail = ctx.get("error", "")
        return InvalidRequest(
            "We could not parse the JSON body of your request"
            + (f" ({detail})" if detail else "")
            + ". Send a JSON object with Content-Type: application/json.",
            code="invalid_json",
        )
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    msg = err.get("msg", "Invalid value")
    if kind == "unsupported_parameter":
        return InvalidRequest(msg, param=param, code="unsupported_parameter")
    if kind in _SELF_EXPLAINING:
        return InvalidRequest(msg, param=param, code="invalid_value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind in ("model_attributes_type", "model_type", "dict_type") and not loc:
        return InvalidRequest("The request body must be a JSON object.", code="invalid_body")
    return InvalidRequest(f"Invalid value for '{param}': {msg}" if param else msg, param=param, code="invalid_value")


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param_from_loc(loc: list[Any]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):
            continue  # pydantic's name of a union branch, not a parameter
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        else:
            out += f".{part}"
    return out or None


async def _service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return exc.response()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(list(exc.errors())).response()


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404:
        err: ServiceError = NotFound(f"Unknown path {request.url.path}.")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
    elif exc.status_code == 413:
        err = PayloadTooLarge(detail)
    elif exc.status_code >= 500:
        err = InternalError(detail)
    else:
        err = InvalidRequest(detail)
        err.status = exc.status_code
    if exc.headers:
        err.headers.update(exc.headers)
    return err.response()


class _HttpMiddleware:
    """Pure ASGI middleware that acts on HTTP requests only: other scopes (lifespan, websocket) go to the
    wrapped app untouched; subclasses handle an HTTP request in `_http`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class CatchAllMiddleware(_HttpMiddleware):
    """Pure ASGI: an exception nothing else handled becomes a logged 500 in the envelope (if the response
    has not started), and the server keeps serving. Starlette's own `Exception` handler would re-raise."""

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def _send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:  # noqa: BLE001 - this is the last resort by design
            mapped = to_service_error(exc)
            if mapped is None:
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                mapped = InternalError("The server had an error while processing your request.")
            if started:
                return  # nothing sensible can be sent any more; the client sees a cut response
            await mapped.response()(scope, receive, send)


class ReceiveGuardMiddleware(_HttpMiddleware):
    """Pure ASGI, outermost in the gateway: a `receive()` that raises instead of returning a message means the
    request's other end is gone (Serve's proxy cancels its call when the client disconnects, and the
    replica's receive then raises Ray's `TaskCancelledError`). It becomes the `http.disconnect` the ASGI spec
    defines for that, so a client that left mid-body is a 499 (`ClientClosed`) and a cut stream stops
    quietly, instead of an unhandled error logged with a traceback and counted as a 500."""

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = False

        async def _receive() -> Message:
            nonlocal gone
            if not gone:
                try:
                    return await receive()
                except Exception as exc:  # noqa: BLE001 - any failure to receive: the client is unreachable
                    log.debug("receive on %s failed (%s): the client is gone", scope.get("path"), type(exc).__name__)
                    gone = True
            return {"type": "http.disconnect"}

        await self.app(scope, _receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """The one place that maps errors to HTTP responses in the OpenAI envelope."""
    app.add_exception_handler(ServiceError, _service_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_middleware(CatchAllMiddleware)


# ---------------------------------------------------------------- Serve's HTTP proxy

# Serve calls this `module:function` in its HTTP proxy at start and wraps the proxy in the middlewares it
# returns; `knnssd serve` (and the k8s manifests) set it, so the errors the proxy makes itself get the envelope.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "services.errors:proxy_middlewares"

_BY_STATUS: dict[int, type[ServiceError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed,
    408: RequestTimeout, 413: PayloadTooLarge, 415: UnsupportedMediaType, 429: RateLimited, 500: InternalError,
    503: ServiceUnavailable,
}


def error_for_status(status: int, message: str) -> ServiceError:
    """The ServiceError class of an HTTP status (for responses made by something other than the gateway)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        err: ServiceError = InvalidRequest(message) if status < 500 else InternalError(message)
        err.status = status
        return err
    return cls(message)


async def _send_error(send: Send, err: ServiceError, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(err.envelope()).encode()
    kept = [(k, v) for k, v in extra_headers if k.lower() not in (b"content-type", b"content-length")]
    names = {k.lower() for k, _ in kept}  # the original response's headers (Retry-After...) win
    headers = kept + [(k.encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()
                      if k.encode("latin-1") not in names]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class EnvelopeMiddleware(_HttpMiddleware):
    """Pure ASGI, outermost in Serve's HTTP proxy: an error response that is not JSON (the proxy's own
    plain-text 404/408/500/503, back-pressure at the gateway) is re-sent in the OpenAI envelope with its
    status and headers (Retry-After) kept; the gateway's JSON passes through untouched. A request that no
    one answered (the gateway replica died under it) gets a 503 envelope instead of uvicorn's bare 500."""

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        held: Message | None = None
        body = bytearray()

        async def _send(message: Message) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start":
                started = True
                ctype = next((v for k, v in message.get("headers", []) if k.lower() == b"content-type"), b"")
                if message["status"] >= 400 and not ctype.startswith(b"application/json"):
                    held = message  # rewritten once its body is complete
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                text = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {held['status']}"
                err = error_for_status(held["status"], text)
                await _send_error(send, err, list(held.get("headers", [])))
                return
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception:  # noqa: BLE001 - the proxy failed before answering: still answer in the envelope
            log.exception("Serve's proxy failed on %s %s", scope.get("method"), scope.get("path"))
            if started:
                return
        if not started:
            await _send_error(send, ServiceUnavailable(
                "The gateway could not answer this request; retry shortly.", retry_after_s=REPLICA_RESTART_RETRY_S))


def _json_400(self: Any, msg: str) -> None:
    """uvicorn's answer to bytes that are not HTTP (a bad Content-Length, an oversized request line...),
    written in the envelope instead of plain text; the connection is closed as uvicorn does."""
    body = json.dumps(InvalidRequest(f"{msg} Check the request line and headers.", code="invalid_http").envelope())
    data = body.encode()
    head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(data)).encode() + b"\r\nconnection: close\r\n\r\n")
    self.transport.write(head + data)
    self.transport.close()


def patch_uvicorn_400() -> None:
    """uvicorn answers unparsable requests itself, before any ASGI app runs, and has no setting for it;
    replace that one method (both HTTP implementations) so those 400s carry the envelope too."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for cls in (getattr(httptools_impl, "HttpToolsProtocol", None), getattr(h11_impl, "H11Protocol", None)):
        if cls is not None and hasattr(cls, "send_400_response"):
            cls.send_400_response = _json_400


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback (see PROXY_CALLBACK_ENV): runs in the proxy process before it listens.
    Besides the envelope, it bounds the time a connection may take to send its headers
    (`services.header_timeout`, `$KNNSSD_HEADER_TIMEOUT_S`)."""
    from starlette.middleware import Middleware

    from services.header_timeout import patch_uvicorn_header_timeout

    patch_uvicorn_400()
    patch_uvicorn_header_timeout()  # connections whose headers do not complete in time are closed
    return [Middleware(EnvelopeMiddleware)]
