"""The HTTP gateway: an OpenAI-compatible FastAPI app over an injected `Backend`.

`build_gateway_app(backend, tenants, limiter, usage, metrics, config)` is a plain factory: it knows
nothing of Ray, so tests drive it with a fake backend, and the Serve ingress deployment builds it in
its replica (`__serve_build_asgi_app__`) with a backend over deployment handles.

Per generation request, admission comes before any work and before the body is read, from the headers
alone: API key -> tenant (401), the tenant's requests in flight on this replica (429), rate limits (429).
Then the body, within `http.body_timeout_s` (408) and `http.max_body_bytes` (413); JSON + schema (400,
nesting depth and lone surrogates included), model (404), max_tokens cap (400), then the backend. The
gateway loads no tokenizer: the tenant's prompt-token limit travels with the request
(`BackendRequest.max_prompt_tokens`) and the replica, which tokenises the prompt once, refuses a longer
prompt on its exact count before any model work (400), and reports the count on its first chunk. The first
backend chunk is awaited before any response starts, so errors raised before decoding (prompt over the
tenant's limit or the context, no replica: 503 + Retry-After) get their real status even when streaming; an error after streaming began is sent as a final `data: {"error":...}` event. Usage, token
limits and metrics are recorded once per request, including aborted streams. Rate-limit windows and usage
are kept per tenant id (never reused), metrics are labelled with tenant names and need an admin key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from services.backend import Backend, BackendChunk, BackendRequest, RouteInfo, normalize_finish_reason
from services.config import AppConfig
from services.errors import (
    ClientClosed,
    Forbidden,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ReceiveGuardMiddleware,
    RequestTimeout,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    install_error_handlers,
    to_service_error,
    validation_error,
)
from services.limits import LimitResult, RateLimiter
from services.metrics import HttpMetricsMiddleware, RequestStats, ServiceMetrics
from services.schemas import (
    AssistantMessage,
    ErrorResponse,
    HealthResponse,
    UsageResponse,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    KnnssdInfo,
    ModelCard,
    ModelList,
    UsageInfo,
    dump_chunk,
)
from services.tenants import Tenant, TenantStore
from services.usage import UsageStore

log = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MAX_JSON_DEPTH = 32  # the schema nests 4 deep; far deeper is an attack, not a request


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer (all in the OpenAI envelope)."""
    why = {400: "Invalid request (the message names the parameter).", 401: "Missing or unknown API key.",
           403: "The key may not use this route.", 404: "Unknown model or path.", 408: "The body came too slowly.",
           413: "Body too large.", 415: "The body is not declared as JSON (Content-Type: application/json).",
           429: "Rate or concurrency limit (Retry-After says when to retry).",
           503: "No replica can take the request now (Retry-After says when to retry)."}
    return {s: {"model": ErrorResponse, "description": why[s]} for s in statuses}


def build_gateway_app(
    backend: Backend,
    tenants: TenantStore,
    limiter: RateLimiter | None,
    usage: UsageStore | None,
    metrics: ServiceMetrics,
    config: AppConfig,
) -> FastAPI:
    """The gateway app. `limiter`/`usage` may be None to run without limits or usage accounting."""
    gw = Gateway(backend, tenants, limiter, usage, metrics, config)
    app = FastAPI(title="KNN-SSD serving", summary="OpenAI-compatible completions with KNN-routed self-speculation")
    install_error_handlers(app)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)  # sees the final status of everything
    app.add_middleware(ReceiveGuardMiddleware)  # outermost: a failed receive is a disconnect (499), not a 500
    app.state.gateway = gw
    gen_errors = _errors(400, 401, 404, 408, 413, 415, 429, 503)
    stream_doc = {"text/event-stream": {"schema": {"type": "string", "description": "with stream: true"}}}

    @app.post(COMPLETIONS, response_model=CompletionResponse, responses={
        200: {"content": stream_doc}, **gen_errors}, openapi_extra=_body_doc(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await gw.generate(request, CompletionRequest)

    @app.post(CHAT, response_model=ChatCompletionResponse, responses={
        200: {"content": stream_doc}, **gen_errors}, openapi_extra=_body_doc(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await gw.generate(request, ChatCompletionRequest)

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401, 503))
    async def list_models(request: Request) -> dict:
        await gw.authenticate(request)
        return ModelList(data=[ModelCard(id=m) for m in backend.models()]).model_dump()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_errors(400, 401, 404, 503))
    async def get_model(request: Request, model_id: str) -> dict:
        await gw.authenticate(request)
        gw.check_model(model_id)
        return ModelCard(id=model_id).model_dump()

    @app.get("/v1/usage", response_model=UsageResponse, responses=_errors(401, 404, 503))
    async def get_usage(request: Request) -> dict:
        tenant = await gw.authenticate(request)
        if usage is None:
            raise NotFound("Usage accounting is not enabled on this server.")
        report = await run_in_threadpool(usage.get, tenant.id)
        rpm, tpm = gw.tenant_limits(tenant)
        return {**report.model_dump(), "tenant": tenant.name,
                "limits": {"rpm": rpm, "tpm": tpm, "window_s": config.limits.window_s}}

    @app.get("/health", response_model=HealthResponse, responses={503: {
        "model": HealthResponse, "description": "No model replica can serve right now."}})
    async def health() -> Response:
        ok, detail = await gw.backend_available()
        info = getattr(backend, "replica_info", None)
        replica = await info() if ok and info is not None else None
        if ok and info is not None and replica is None:  # no answer: the replica may have died meanwhile
            ok, detail = await gw.backend_available()
        body = HealthResponse(status="ok" if ok else "unavailable", models=backend.models(), detail=detail, replica=replica)
        headers = None if ok else {"retry-after": "5"}
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503, headers=headers)

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text."},
        **_errors(401, 403, 503)})
    async def prometheus(request: Request) -> Response:
        if not config.http.metrics_public:
            tenant = await gw.authenticate(request)
            if not tenant.admin:
                raise Forbidden("/metrics needs the key of an admin tenant (knnssd tenants add NAME --admin).")
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi_with_models(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The request body of a route that reads its body itself (after admission), for the OpenAPI document."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _openapi_with_models(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request models (referenced by `_body_doc`), without FastAPI's 422 (this
    server answers validation errors with 400 in the OpenAI envelope)."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    gw: Gateway = app.state.gateway
    for model in (CompletionRequest, ChatCompletionRequest):
        full = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation")
        schemas.update(full.pop("$defs", {}))
        props = full["properties"]
        # what this server accepts, not just the types: its models and its max_tokens cap
        props["model"]["enum"] = gw.backend.models()
        for name in ("max_tokens", "max_completion_tokens"):
            for alt in props.get(name, {}).get("anyOf", []):
                if alt.get("type") == "integer":
                    alt["maximum"] = gw.config.generation.max_tokens_limit
        schemas[model.__name__] = full
    for path in doc.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc


class Gateway:
    """The request logic behind the routes; holds the injected collaborators."""

    def __init__(self, backend, tenants, limiter, usage, metrics, config) -> None:
        self.backend: Backend = backend
        self.tenants: TenantStore = tenants
        self.limiter: RateLimiter | None = limiter
        self.usage: UsageStore | None = usage
        self.metrics: ServiceMetrics = metrics
        self.config: AppConfig = config
        self.in_flight: dict[str, int] = {}  # tenant id -> requests admitted and not finished, on this replica

    # ---------------------------------------------------------------- checks

    async def authenticate(self, request: Request) -> Tenant:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.", code="missing_api_key"
            )
        tenant = await run_in_threadpool(self.tenants.authenticate, key)
        if tenant is None:
            raise Unauthorized("Incorrect API key provided.")
        request.state.tenant = tenant.name
        return tenant

    def check_model(self, model: str) -> None:
        if model not in self.backend.models():
            raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")

    def tenant_limits(self, tenant: Tenant) -> tuple[int, int]:
        d = self.config.limits
        return (d.default_rpm if tenant.rpm is None else tenant.rpm, d.default_tpm if tenant.tpm is None else tenant.tpm)

    def enter(self, tenant: Tenant) -> _Lease:
        """Count one request of `tenant` in flight on this replica, or 429 at once if it has too many (so a
        tenant holding connections open cannot take every slot of the gateway from the others)."""
        d = self.config.limits
        cap = d.default_max_concurrent if tenant.max_concurrent is None else tenant.max_concurrent
        now = self.in_flight.get(tenant.id, 0)
        if cap and now >= cap:
            self.metrics.observe_rate_limited(tenant.name, "concurrent")
            raise RateLimited(
                f"Too many requests in flight for this key ({now}, limit {cap}); wait for one to finish.",
                kind="concurrent_requests", retry_after_s=1.0,
            )
        self.in_flight[tenant.id] = now + 1
        return _Lease(self, tenant.id)

    async def admit(self, tenant: Tenant) -> LimitResult:
        if self.limiter is None:
            return LimitResult(allowed=True)
        rpm, tpm = self.tenant_limits(tenant)
        res = await run_in_threadpool(self.limiter.check, tenant.id, rpm, tpm)
        if res.degraded:
            self.metrics.observe_redis_error("limits")
        if not res.allowed:
            kind = res.exceeded or "requests"
            limit = res.limit_requests if kind == "requests" else res.limit_tokens
            self.metrics.observe_rate_limited(tenant.name, kind)
            raise RateLimited(
                f"Rate limit reached for {kind} per {self.config.limits.window_s:g}s (limit {limit}). "
                f"Retry after {res.retry_after_s:.2f}s.",
                kind=kind,
                retry_after_s=res.retry_after_s,
                headers=res.headers(),
            )
        return res

    def prompt_cap(self, tenant: Tenant) -> int:
        """The tenant's prompt-token limit (0: none). It travels with the request: the replica checks it on its
        exact count, before any model work (services.replica)."""
        d = self.config.limits
        return d.default_max_prompt_tokens if tenant.max_prompt_tokens is None else tenant.max_prompt_tokens

    async def backend_available(self) -> tuple[bool, str | None]:
        """Whether a model replica can serve (backends without a way to tell are assumed able)."""
        probe = getattr(self.backend, "available", None)
        if probe is None:
            return True, None
        try:
            return await probe()
        except Exception as exc:  # noqa: BLE001 - a failing probe means we cannot vouch for the replicas
            log.warning("health probe failed", exc_info=True)
            return False, f"health probe failed: {type(exc).__name__}"

    # ---------------------------------------------------------------- generation

    async def generate(self, request: Request, schema: type[CompletionRequest] | type[ChatCompletionRequest]) -> Response:
        started = time.perf_counter()
        tenant = await self.authenticate(request)
        lease = self.enter(tenant)
        try:
            return await self._generate(request, schema, tenant, lease, started)
        except BaseException:
            lease.release()
            raise

    async def _generate(self, request: Request, schema, tenant: Tenant, lease: _Lease, started: float) -> Response:
        limit = await self.admit(tenant)  # from the headers: a refused tenant never gets to send its body
        http = self.config.http
        data = await read_json_body(request, http.max_body_bytes, http.body_timeout_s)
        req = parse_body(schema, data)
        chat = isinstance(req, ChatCompletionRequest)
        self.check_model(req.model)
        cap = self.config.generation.max_tokens_limit
        max_new = req.requested_max_tokens() or min(self.config.generation.default_max_tokens, cap)
        if max_new > cap:
            param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
            raise InvalidRequest(
                f"Invalid value for '{param}': at most {cap} on this server.", param=param, code="invalid_value"
            )

        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        breq = BackendRequest(
            request_id=request_id,
            tenant=tenant.name,
            model=req.model,
            sampling=req.sampling_params(max_new),
            prompt=None if chat else req.prompt,
            messages=req.backend_messages() if chat else None,
            speculative=req.speculative,
            index_version=tenant.index_version,
            max_prompt_tokens=self.prompt_cap(tenant),
        )
        stats = RequestStats(
            endpoint=CHAT if chat else COMPLETIONS, tenant=tenant.name, model=req.model,
            stream=req.stream, speculative=req.speculative, started=started,
        )
        headers = {"x-request-id": request_id, **limit.headers()}
        self.metrics.inflight.inc()
        lease.gauge = self.metrics.inflight
        it = self.backend.stream(breq)
        try:
            first = await _next(it)
            if first is None:
                raise InternalError("The model returned no output.")
        except BaseException as exc:
            await _aclose(it)
            if isinstance(exc, Exception):
                raise self._mapped(exc, request_id) from exc
            raise

        if req.stream:
            stats.observe_chunk(first)
            headers.update(_route_headers(stats.route))
            return _LeasedStream(
                self._sse(it, first, req, chat, stats, tenant, request_id, lease),
                lease=lease,
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache"},
            )

        try:
            text = await self._collect(it, first, stats)
        except Exception as exc:
            stats.error = "backend"
            stats.observe_finish()
            self.metrics.observe_request(stats)
            raise self._mapped(exc, request_id) from exc
        finally:
            lease.release()
            await _aclose(it)
        stats.observe_finish()
        await self._account(tenant, stats)
        finish = normalize_finish_reason(stats.finish_reason)
        usage = _usage(stats)
        info = _knnssd(stats)
        resp: BaseModel
        if chat:
            resp = ChatCompletionResponse(
                id=request_id, model=req.model, usage=usage, knnssd=info,
                choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)],
            )
        else:
            resp = CompletionResponse(
                id=request_id, model=req.model, usage=usage, knnssd=info,
                choices=[CompletionChoice(text=text, finish_reason=finish)],
            )
        headers.update(_route_headers(stats.route, info))
        return JSONResponse(resp.model_dump(mode="json"), headers=headers)

    async def _collect(self, it: AsyncIterator[BackendChunk], first: BackendChunk, stats: RequestStats) -> str:
        parts = []
        chunk: BackendChunk | None = first
        while chunk is not None:
            stats.observe_chunk(chunk)
            parts.append(chunk.text)
            if chunk.is_last:
                break
            chunk = await _next(it)
        return "".join(parts)

    async def _sse(self, it, first, req, chat: bool, stats: RequestStats, tenant: Tenant, request_id: str,
                   lease: _Lease):
        created = int(time.time())
        accounted = False

        def piece(text: str | None, finish: str | None, role: bool = False, **extra: Any) -> str:
            if chat:
                delta = ChatDelta(role="assistant" if role else None, content=text)
                return dump_chunk(ChatCompletionChunk(
                    id=request_id, created=created, model=req.model,
                    choices=[ChatChunkChoice(delta=delta, finish_reason=finish)], **extra,
                ))
            return dump_chunk(CompletionResponse(
                id=request_id, created=created, model=req.model,
                choices=[CompletionChoice(text=text or "", finish_reason=finish)], **extra,
            ))

        try:
            if chat:
                yield piece("", None, role=True)
            chunk: BackendChunk | None = first
            while chunk is not None:
                if chunk is not first:
                    stats.observe_chunk(chunk)
                if chunk.text:
                    yield piece(chunk.text, None)
                if chunk.is_last:
                    break
                chunk = await _next(it)
            stats.observe_finish()
            info = _knnssd(stats)
            yield piece(None, normalize_finish_reason(stats.finish_reason), knnssd=info)
            if req.include_usage:
                usage_chunk = (
                    ChatCompletionChunk(id=request_id, created=created, model=req.model, choices=[], usage=_usage(stats),
                                        knnssd=info)
                    if chat
                    else CompletionResponse(id=request_id, created=created, model=req.model, choices=[],
                                            usage=_usage(stats), knnssd=info)
                )
                yield dump_chunk(usage_chunk)
            accounted = True
            await self._account(tenant, stats)
            yield "data: [DONE]\n\n"
        except Exception as exc:  # after the response started: report in-band, as OpenAI does
            err = self._mapped(exc, request_id)
            stats.error = err.code or "error"
            yield "data: " + json.dumps(err.envelope()) + "\n\n"
        finally:
            with anyio.CancelScope(shield=True):
                await _aclose(it)
                if not accounted:  # aborted or failed stream: still count what was generated
                    stats.observe_finish()
                    await self._account(tenant, stats)
            lease.release()

    async def _account(self, tenant: Tenant, stats: RequestStats) -> None:
        """Usage counters, the token window and metrics for one finished (or aborted) request."""
        tokens = stats.prompt_tokens + stats.completion_tokens

        def write() -> tuple[bool, bool]:
            ok_limits = self.limiter.record_tokens(tenant.id, tokens) if self.limiter is not None else True
            ok_usage = (
                self.usage.record(tenant.id, stats.prompt_tokens, stats.completion_tokens)
                if self.usage is not None
                else True
            )
            return ok_limits, ok_usage

        if stats.prompt_tokens or stats.completion_tokens:
            ok_limits, ok_usage = await run_in_threadpool(write)
            if not ok_limits:
                self.metrics.observe_redis_error("limits")
            if not ok_usage:
                self.metrics.observe_redis_error("usage")
        self.metrics.observe_request(stats)

    def _mapped(self, exc: BaseException, request_id: str) -> ServiceError:
        mapped = to_service_error(exc)
        if mapped is None:
            log.error("request %s failed in the backend", request_id, exc_info=exc)
            mapped = InternalError("The server had an error while processing your request.")
        return mapped


# ---------------------------------------------------------------- helpers


class _Lease:
    """One admitted request: its slot in the tenant's in-flight count (and the in-flight gauge once it
    reached the backend). `release()` is idempotent, so every way a request ends may call it."""

    def __init__(self, gw: Gateway, tenant_id: str) -> None:
        self.gw = gw
        self.tenant_id = tenant_id
        self.gauge: Any = None
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        left = self.gw.in_flight.get(self.tenant_id, 1) - 1
        if left > 0:
            self.gw.in_flight[self.tenant_id] = left
        else:
            self.gw.in_flight.pop(self.tenant_id, None)
        if self.gauge is not None:
            self.gauge.dec()


class _LeasedStream(StreamingResponse):
    """A stream that releases its request's lease however it ends, even if the client left before the
    body started (the generator's own `finally` never runs then)."""

    def __init__(self, content: Any, *, lease: _Lease, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.lease = lease

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.release()


def check_content_type(value: str | None) -> None:
    """415 unless the body is declared as JSON: `application/json`, with no charset or `charset=utf-8` (what
    the `openai` client sends). A strict server: `curl -d` without `-H 'Content-Type: application/json'`
    sends form encoding, and a form, `text/plain` or multipart body is refused rather than guessed at."""
    media, _, params = (value or "").partition(";")
    media = media.strip().lower()
    if media != "application/json":
        got = f"'{media}'" if media else "no Content-Type"
        raise UnsupportedMediaType(
            f"The request body must be JSON sent with 'Content-Type: application/json' (got {got})."
        )
    for param in params.split(";"):
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(
                f"The request body must be UTF-8 JSON (got charset={charset.strip()}); send "
                "'Content-Type: application/json'."
            )


async def read_json_body(request: Request, limit: int, timeout_s: float | None = None) -> Any:
    """The body as JSON: 415 unless the Content-Type says JSON (`check_content_type`), 413 past `limit`,
    408 when the whole body has not arrived within `timeout_s` (a client that announces more than it sends
    must not hold a gateway slot), 400 for malformed, too deeply nested or non-UTF-8-encodable JSON, a body
    that is not UTF-8 (UTF-16/32, a byte order mark) or an object with a key twice (`parse_json_body`)."""
    check_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest("Invalid Content-Length header.") from None
        if size > limit:
            raise PayloadTooLarge(f"Request body of {size} bytes exceeds the limit of {limit} bytes.")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
    except ClientDisconnect:
        raise ClientClosed("The client closed the connection before sending the whole body.") from None
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {timeout_s:g}s ({len(body)} bytes"
            + (f" of {declared} announced" if declared is not None else "") + ")."
        ) from None
    return parse_json_body(bytes(body))


def parse_json_body(body: bytes) -> Any:
    """Strict JSON (RFC 8259): UTF-8 without a byte order mark, no NaN/Infinity, no key twice in an object
    (which value would win is parser-dependent, so `"model": "a", "model": "b"` is refused, not guessed)."""
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    if body.startswith(b"\xef\xbb\xbf"):
        raise InvalidRequest("The JSON body starts with a byte order mark; send UTF-8 without one.",
                             code="invalid_json")
    if b"\x00" in body or body.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InvalidRequest("The JSON body is not UTF-8 (it looks like UTF-16 or UTF-32); send UTF-8.",
                             code="invalid_json")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise InvalidRequest(
            f"The JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels).", code="invalid_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}). Send a JSON object.", code="invalid_json"
        ) from None
    check_json_values(data)
    return data


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_json_values(data: Any) -> None:
    """400 for JSON nested deeper than MAX_JSON_DEPTH, or a string holding a lone UTF-16 surrogate (valid
    JSON escapes, but no UTF-8 text: the tokenizer and every encoder after it would fail), naming where."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(
                f"The JSON body is nested too deeply at '{path}' (at most {MAX_JSON_DEPTH} levels).",
                param=_top(path), code="invalid_json",
            )
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise InvalidRequest(
                    f"Invalid value for '{path or 'body'}': the string holds a lone UTF-16 surrogate "
                    "(\\ud800-\\udfff without its pair), which is not text.", param=path or None,
                    code="invalid_value",
                )
        elif isinstance(value, dict):
            for k, v in value.items():
                child = f"{path}.{k}" if path else str(k)
                if _SURROGATE.search(k):
                    raise InvalidRequest("A JSON key holds a lone UTF-16 surrogate.", code="invalid_value")
                stack.append((v, child, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


def _top(path: str) -> str | None:
    """The top-level parameter of a path like 'messages[0].content'."""
    return re.split(r"[.\[]", path, maxsplit=1)[0] or None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            shown = key if len(key) <= 64 else key[:64] + "..."
            raise InvalidRequest(f"The JSON body has the key '{shown}' more than once in one object; send each "
                                 "key once.", code="duplicate_key")
        obj[key] = value
    return obj


def parse_body(schema: type[BaseModel], data: Any) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(list(exc.errors(include_url=False))) from None


async def _next(it: AsyncIterator[BackendChunk]) -> BackendChunk | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _aclose(it: Any) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001 - closing a failed stream must not mask the real error
            log.debug("closing a backend stream failed", exc_info=True)


def _usage(stats: RequestStats) -> UsageInfo:
    p, c = stats.prompt_tokens, stats.completion_tokens
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _knnssd(stats: RequestStats) -> KnnssdInfo:
    """The response's `knnssd` field, built once per response from what the backend reported (its route
    already says "plain" for a request that turned speculation off)."""
    r = stats.route
    return KnnssdInfo(
        domain=r.domain if r else None,
        config_id=r.config_id if r else None,
        index_version=r.index_version if r else None,
        fallback=bool(r and r.fallback),
        speculative=stats.speculative,
        acceptance_rate=stats.acceptance_rate,
        stats=stats.decode,
        replica=stats.replica,
    )


def _hval(v: Any) -> str:
    return str(v).replace("\r", " ").replace("\n", " ").encode("ascii", "replace").decode()


def _route_headers(route: RouteInfo | None, info: KnnssdInfo | None = None) -> dict[str, str]:
    """x-knnssd-* headers from the route; with the response's `info`, its acceptance too (a stream's headers
    leave before decoding, so they carry none)."""
    h = {}
    if route is not None:
        for name, value in (("domain", route.domain), ("config-id", route.config_id),
                            ("index-version", route.index_version)):
            if value is not None:
                h[f"x-knnssd-{name}"] = _hval(value)
    if info is not None:
        h["x-knnssd-acceptance"] = f"{info.acceptance_rate:.4f}" if info.acceptance_rate is not None else "none"
    return h
