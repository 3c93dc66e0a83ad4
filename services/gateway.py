"""The HTTP gateway: an OpenAI-compatible FastAPI app over an injected `Backend`.

`build_gateway_app(backend, tenants, limiter, usage, metrics, config)` is a plain factory: it knows
nothing of Ray, so tests drive it with a fake backend, and the Serve ingress deployment builds it in
its replica (`__serve_build_asgi_app__`) with a backend over deployment handles.

Per generation request, in order: API key -> tenant (401), body size (413), JSON + schema (400), model
(404), max_tokens cap (400), rate limits (429), then the backend. The first backend chunk is awaited
before any response starts, so errors raised before decoding (prompt too long, no replica) get their
real status even when streaming; an error after streaming began is sent as a final `data: {"error":...}`
event. Usage, token limits and metrics are recorded once per request, including aborted streams.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from services.backend import Backend, BackendChunk, BackendRequest, normalize_finish_reason
from services.config import AppConfig
from services.errors import (
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceError,
    Unauthorized,
    install_error_handlers,
    to_service_error,
    validation_error,
)
from services.limits import LimitResult, RateLimiter
from services.metrics import HttpMetricsMiddleware, RequestStats, ServiceMetrics
from services.schemas import (
    AssistantMessage,
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
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)  # outermost: sees the final status of everything
    app.state.gateway = gw

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await gw.generate(request, CompletionRequest)

    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await gw.generate(request, ChatCompletionRequest)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        await gw.authenticate(request)
        return ModelList(data=[ModelCard(id=m) for m in backend.models()]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str) -> dict:
        await gw.authenticate(request)
        gw.check_model(model_id)
        return ModelCard(id=model_id).model_dump()

    @app.get("/v1/usage")
    async def get_usage(request: Request) -> dict:
        tenant = await gw.authenticate(request)
        if usage is None:
            raise NotFound("Usage accounting is not enabled on this server.")
        report = await run_in_threadpool(usage.get, tenant.name)
        rpm, tpm = gw.tenant_limits(tenant)
        return {**report.model_dump(), "limits": {"rpm": rpm, "tpm": tpm, "window_s": config.limits.window_s}}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": backend.models()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


class Gateway:
    """The request logic behind the routes; holds the injected collaborators."""

    def __init__(self, backend, tenants, limiter, usage, metrics, config) -> None:
        self.backend: Backend = backend
        self.tenants: TenantStore = tenants
        self.limiter: RateLimiter | None = limiter
        self.usage: UsageStore | None = usage
        self.metrics: ServiceMetrics = metrics
        self.config: AppConfig = config

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

    async def admit(self, tenant: Tenant) -> LimitResult:
        if self.limiter is None:
            return LimitResult(allowed=True)
        rpm, tpm = self.tenant_limits(tenant)
        res = await run_in_threadpool(self.limiter.check, tenant.name, rpm, tpm)
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

    # ---------------------------------------------------------------- generation

    async def generate(self, request: Request, schema: type[CompletionRequest] | type[ChatCompletionRequest]) -> Response:
        started = time.perf_counter()
        tenant = await self.authenticate(request)
        data = await read_json_body(request, self.config.http.max_body_bytes)
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
        limit = await self.admit(tenant)

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
        )
        stats = RequestStats(
            endpoint=CHAT if chat else COMPLETIONS, tenant=tenant.name, model=req.model,
            stream=req.stream, speculative=req.speculative, started=started,
        )
        headers = {"x-request-id": request_id, **limit.headers()}
        self.metrics.inflight.inc()
        it = self.backend.stream(breq)
        try:
            first = await _next(it)
            if first is None:
                raise InternalError("The model returned no output.")
        except BaseException as exc:
            self.metrics.inflight.dec()
            await _aclose(it)
            if isinstance(exc, Exception):
                raise self._mapped(exc, request_id) from exc
            raise

        if req.stream:
            stats.observe_chunk(first)
            headers.update(_route_headers(stats, req.speculative, final=False))
            return StreamingResponse(
                self._sse(it, first, req, chat, stats, tenant, request_id),
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
            self.metrics.inflight.dec()
            await _aclose(it)
        stats.observe_finish()
        await self._account(tenant, stats)
        finish = normalize_finish_reason(stats.finish_reason)
        usage = _usage(stats)
        info = _knnssd(stats, req.speculative)
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
        headers.update(_route_headers(stats, req.speculative, final=True))
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

    async def _sse(self, it, first, req, chat: bool, stats: RequestStats, tenant: Tenant, request_id: str):
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
            info = _knnssd(stats, req.speculative)
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
            self.metrics.inflight.dec()

    async def _account(self, tenant: Tenant, stats: RequestStats) -> None:
        """Usage counters, the token window and metrics for one finished (or aborted) request."""
        tokens = stats.prompt_tokens + stats.completion_tokens

        def write() -> tuple[bool, bool]:
            ok_limits = self.limiter.record_tokens(tenant.name, tokens) if self.limiter is not None else True
            ok_usage = (
                self.usage.record(tenant.name, stats.prompt_tokens, stats.completion_tokens)
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


async def read_json_body(request: Request, limit: int) -> Any:
    """The body as JSON, whatever the Content-Type says (curl -d sends form encoding); 413 past `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest("Invalid Content-Length header.") from None
        if size > limit:
            raise PayloadTooLarge(f"Request body of {size} bytes exceeds the limit of {limit} bytes.")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return json.loads(bytes(body), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}). Send a JSON object.", code="invalid_json"
        ) from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


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


def _knnssd(stats: RequestStats, speculative: bool) -> KnnssdInfo:
    r = stats.route
    return KnnssdInfo(
        domain=r.domain if r else None,
        config_id="plain" if not speculative else (r.config_id if r else None),
        index_version=r.index_version if r else None,
        fallback=bool(r and r.fallback),
        speculative=speculative,
        acceptance_rate=None if stats.acceptance_rate is None else round(stats.acceptance_rate, 4),
        stats=stats.decode,
    )


def _hval(v: Any) -> str:
    return str(v).replace("\r", " ").replace("\n", " ").encode("ascii", "replace").decode()


def _route_headers(stats: RequestStats, speculative: bool, final: bool) -> dict[str, str]:
    """x-knnssd-* headers; a stream's headers leave before decoding, so they carry no acceptance."""
    info = _knnssd(stats, speculative)
    h = {}
    if info.domain is not None:
        h["x-knnssd-domain"] = _hval(info.domain)
    if info.config_id is not None:
        h["x-knnssd-config-id"] = _hval(info.config_id)
    if info.index_version is not None:
        h["x-knnssd-index-version"] = _hval(info.index_version)
    if final:
        h["x-knnssd-acceptance"] = f"{info.acceptance_rate:.4f}" if info.acceptance_rate is not None else "none"
    return h
