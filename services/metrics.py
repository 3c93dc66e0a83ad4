"""Prometheus metrics of the gateway, on a registry of its own (several apps or tests never collide).

Stats apart from exporters: `RequestStats` collects one request's numbers as chunks arrive
(`observe_chunk`, `observe_finish`); `ServiceMetrics.observe_request` only reads a finished one.
HTTP requests by tenant and status are counted by `HttpMetricsMiddleware`, so refused requests
(400/401/413/429...) count too. Routing counters come from each request's `RouteInfo`, so the gateway
exports what the router did without scraping it.

Note: each gateway replica has its own registry; `/metrics` answers for the replica that served it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.backend import BackendChunk, RouteInfo

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/usage", "/health", "/metrics",
             "/openapi.json", "/docs")
# nginx's status for "the client closed the connection before the answer was complete"
CLIENT_CLOSED = "499"


@dataclass
class RequestStats:
    """One generation request, as seen by the gateway."""

    endpoint: str
    tenant: str
    model: str
    stream: bool = False
    speculative: bool = True
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    route: RouteInfo | None = None
    decode: dict[str, Any] | None = None  # DecodeStats.to_dict() from the last chunk
    replica: str | None = None
    queue_depth: int | None = None
    error: str | None = None  # set when the request failed after it started

    def observe_chunk(self, chunk: BackendChunk, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if chunk.tokens and self.first_token_at is None:
            self.first_token_at = now
        self.completion_tokens += chunk.tokens
        if chunk.route is not None:
            self.route = chunk.route
        if chunk.usage is not None:
            self.prompt_tokens = chunk.usage.prompt_tokens or self.prompt_tokens
            if chunk.is_last and chunk.usage.completion_tokens:
                self.completion_tokens = chunk.usage.completion_tokens
        if chunk.stats is not None:
            self.decode = chunk.stats
        if chunk.replica is not None:
            self.replica = chunk.replica
        if chunk.queue_depth is not None:
            self.queue_depth = chunk.queue_depth
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason

    def observe_finish(self, now: float | None = None) -> None:
        self.finished_at = time.perf_counter() if now is None else now

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token_at is None or self.finished_at is None or self.completion_tokens < 2:
            return None
        return (self.finished_at - self.first_token_at) / (self.completion_tokens - 1)

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started

    @property
    def acceptance_rate(self) -> float | None:
        """The engine's (DecodeStats), or None when nothing was drafted (plain decoding, or no stats yet)."""
        if not self.decode or not self.decode.get("drafted"):
            return None
        return self.decode.get("acceptance_rate")


class ServiceMetrics:
    """The gateway's Prometheus metrics. Pass a registry to share one; by default each instance has its own."""

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "knnssd") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, namespace
        self.http_requests = Counter(
            "http_requests", "HTTP requests by endpoint, tenant and status.", ["endpoint", "tenant", "status"],
            namespace=ns, registry=r,
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Time from request to the first generated token.", ["endpoint"],
            buckets=TTFT_BUCKETS, namespace=ns, registry=r,
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds", "Mean time per generated token after the first, per request.",
            ["endpoint"], buckets=TPOT_BUCKETS, namespace=ns, registry=r,
        )
        self.e2e = Histogram(
            "request_duration_seconds", "Generation request latency, end to end.", ["endpoint"],
            buckets=E2E_BUCKETS, namespace=ns, registry=r,
        )
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens by tenant.", ["tenant"], namespace=ns, registry=r)
        self.generation_tokens = Counter(
            "generation_tokens", "Generated tokens by tenant.", ["tenant"], namespace=ns, registry=r
        )
        self.finished = Counter(
            "requests_finished", "Finished generations by finish reason and speculative flag.",
            ["finish_reason", "speculative"], namespace=ns, registry=r,
        )
        # speculative decoding, in vLLM's spirit (num_drafts, num_draft_tokens, num_accepted_tokens)
        spec = ["domain", "config_id"]
        self.spec_drafts = Counter(
            "spec_decode_drafts", "Verify steps that checked a draft.", spec, namespace=ns, registry=r
        )
        self.spec_draft_tokens = Counter(
            "spec_decode_draft_tokens", "Tokens drafted.", spec, namespace=ns, registry=r
        )
        self.spec_accepted_tokens = Counter(
            "spec_decode_accepted_tokens", "Drafted tokens the verify pass accepted.", spec, namespace=ns, registry=r
        )
        # routing
        self.route_decisions = Counter(
            "route_decisions", "Requests routed, by domain and draft config.", spec, namespace=ns, registry=r
        )
        self.route_cache = Counter(
            "route_cache", "Routing decisions served from the Redis cache or computed.", ["result"],
            namespace=ns, registry=r,
        )
        self.route_fallbacks = Counter(
            "route_fallbacks", "Requests routed to the fallback config (no centroid near).", namespace=ns, registry=r
        )
        self.redis_errors = Counter(
            "redis_errors", "Redis errors survived, by component (router, limits, usage, tenants).", ["component"],
            namespace=ns, registry=r,
        )
        self.rate_limited = Counter(
            "rate_limited", "Requests refused by a rate limit.", ["tenant", "limit"], namespace=ns, registry=r
        )
        self.queue_depth = Gauge(
            "replica_queue_depth", "Requests ongoing at a model replica when it last started one.", ["replica"],
            namespace=ns, registry=r,
        )
        self.inflight = Gauge(
            "requests_in_flight", "Generation requests this gateway replica is serving.", namespace=ns, registry=r
        )

    # -- observers (read stats, write metrics)

    def observe_http(self, endpoint: str, tenant: str, status: int | str) -> None:
        self.http_requests.labels(endpoint, tenant, str(status)).inc()

    def observe_request(self, s: RequestStats) -> None:
        ep = s.endpoint
        if s.ttft_s is not None:
            self.ttft.labels(ep).observe(s.ttft_s)
        if s.tpot_s is not None:
            self.tpot.labels(ep).observe(s.tpot_s)
        if s.e2e_s is not None:
            self.e2e.labels(ep).observe(s.e2e_s)
        self.prompt_tokens.labels(s.tenant).inc(s.prompt_tokens)
        self.generation_tokens.labels(s.tenant).inc(s.completion_tokens)
        self.finished.labels(s.finish_reason or ("error" if s.error else "aborted"), str(s.speculative).lower()).inc()
        domain = (s.route.domain if s.route else None) or "unknown"
        config_id = (s.route.config_id if s.route else None) or "unknown"
        if s.decode and s.decode.get("drafted"):
            self.spec_drafts.labels(domain, config_id).inc(s.decode.get("steps", 0))
            self.spec_draft_tokens.labels(domain, config_id).inc(s.decode["drafted"])
            self.spec_accepted_tokens.labels(domain, config_id).inc(s.decode.get("accepted", 0))
        if s.route is not None:
            self.route_decisions.labels(domain, config_id).inc()
            if s.route.cache_hit is not None:
                self.route_cache.labels("hit" if s.route.cache_hit else "miss").inc()
            if s.route.fallback:
                self.route_fallbacks.inc()
            if s.route.redis_error:
                self.redis_errors.labels("router").inc()
        if s.replica is not None and s.queue_depth is not None:
            self.queue_depth.labels(s.replica).set(s.queue_depth)

    def observe_rate_limited(self, tenant: str, limit: str) -> None:
        self.rate_limited.labels(tenant, limit).inc()

    def observe_redis_error(self, component: str) -> None:
        self.redis_errors.labels(component).inc()

    def set_queue_depth(self, replica: str, depth: int) -> None:
        self.queue_depth.labels(replica).set(depth)

    def render(self) -> tuple[bytes, str]:
        """Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent); for tests and quick checks."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v


class HttpMetricsMiddleware:
    """Pure ASGI: count every HTTP request by endpoint, tenant (set on `request.state.tenant` by auth,
    "-" before auth) and status. Unknown paths share one endpoint label to bound cardinality. A request
    whose client went away before the answer was complete (cancelled by Serve, a stream cut short) counts
    as status "499", not as a server error."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | str = 500
        complete = False
        gone = False

        async def _receive() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        async def _send(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        except (asyncio.CancelledError, OSError):
            gone = True
            raise
        finally:
            if gone and not complete:
                status = CLIENT_CLOSED
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            tenant = (scope.get("state") or {}).get("tenant", "-")
            self.metrics.observe_http(endpoint, tenant, status)
