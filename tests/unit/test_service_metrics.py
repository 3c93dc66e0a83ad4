"""Request stats collect; the exporter only reads them. Separate registries never collide."""

from __future__ import annotations

from services.backend import BackendChunk, RouteInfo, Usage
from services.metrics import RequestStats, ServiceMetrics


def test_request_stats_timings():
    s = RequestStats(endpoint="/v1/completions", tenant="t", model="m", started=10.0)
    s.observe_chunk(BackendChunk(text="a", tokens=1, route=RouteInfo(domain="code", config_id="c1"),
                                 usage=Usage(5, 0)), now=10.5)
    s.observe_chunk(BackendChunk(text="b", tokens=2), now=10.7)
    s.observe_chunk(BackendChunk(text="c", tokens=1, finish_reason="stop", usage=Usage(5, 4),
                                 stats={"drafted": 4, "accepted": 3, "steps": 2, "acceptance_rate": 0.75}), now=10.9)
    s.observe_finish(now=11.1)
    assert s.ttft_s == 0.5 and abs(s.tpot_s - 0.6 / 3) < 1e-9 and abs(s.e2e_s - 1.1) < 1e-9
    assert (s.prompt_tokens, s.completion_tokens, s.finish_reason) == (5, 4, "stop")
    assert s.acceptance_rate == 0.75 and s.route.domain == "code"


def test_two_registries_do_not_collide():
    a, b = ServiceMetrics(), ServiceMetrics()
    s = RequestStats(endpoint="/v1/completions", tenant="t", model="m")
    s.observe_chunk(BackendChunk(text="x", tokens=1, finish_reason="length", usage=Usage(2, 1),
                                 route=RouteInfo(domain="d", config_id="c", fallback=True, cache_hit=False,
                                                 redis_error=True),
                                 stats={"drafted": 3, "accepted": 1, "steps": 2, "acceptance_rate": 0.3333}))
    s.observe_finish()
    a.observe_request(s)
    assert a.value("knnssd_route_fallbacks_total") == 1 and b.value("knnssd_route_fallbacks_total") == 0
    assert a.value("knnssd_route_cache_total", {"result": "miss"}) == 1
    assert a.value("knnssd_redis_errors_total", {"component": "router"}) == 1
    assert a.value("knnssd_spec_decode_drafts_total", {"domain": "d", "config_id": "c"}) == 2
    assert a.value("knnssd_requests_finished_total", {"finish_reason": "length", "speculative": "true"}) == 1
    body, ctype = a.render()
    assert b"knnssd_spec_decode_accepted_tokens_total" in body and ctype.startswith("text/plain")
