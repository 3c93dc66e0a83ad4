"""The deployment bodies without Ray: replica (fake engine), router service (fake router), Ray backend (fake
handles) and the ingress class."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from engine.config import DraftConfig, SamplingParams
from services.backend import BackendRequest, RouteInfo
from services.config import AppConfig
from services.errors import InvalidRequest
from services.ray_backend import RayBackend
from services.replica import ModelReplica
from services.keys import router_key_prefix
from services.routing import Routed, RouterService
from tests.tiny import tiny_engine


class FakeEngine:
    """The real engine and scheduler on a tiny random model (tests.tiny), recording the draft configs the
    replica hands it; `delay` slows each scheduler iteration so requests overlap."""

    def __init__(self, delay: float = 0.0, max_seq_len: int = 100) -> None:
        self.eng = tiny_engine(max_seq_len=max_seq_len)
        self.delay = delay
        self.drafts: list[DraftConfig] = []
        self.num_layers = self.eng.num_layers

    def __getattr__(self, name):
        return getattr(self.eng, name)

    def sequence(self, ids, params, draft=None, emit=None, rid=None):
        self.drafts.append(draft)
        return self.eng.sequence(ids, params, draft, emit, rid)

    def scheduler(self, settings=None):
        sched = self.eng.scheduler(settings)
        step, delay = sched.step, self.delay

        def slow_step():
            time.sleep(delay)
            return step()

        sched.step = slow_step
        return sched


def _req(prompt="a b c", n=3, speculative=True, **kw):
    return BackendRequest(request_id="r", tenant="t", model="smollm2", sampling=SamplingParams(max_new_tokens=n),
                          prompt=prompt, speculative=speculative, **kw)


async def _collect(agen):
    return [c async for c in agen]


ROUTE = RouteInfo(domain="code", config_id="ssd-x", index_version="v1")
CFG = DraftConfig(skip_mlp=(2, 3), max_draft=3, confidence=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _solo(eng, req):
    ids = eng.encode_prompt(prompt=req.prompt, messages=req.messages)
    return ids, eng.eng.generate(ids, req.sampling, DraftConfig.plain())


def test_replica_streams_by_the_backend_contract():
    eng = FakeEngine()
    rep = ModelReplica(AppConfig(), engine=eng, threads=1, name="rep-1")
    req = _req(n=12)
    chunks = asyncio.run(_collect(rep.generate(req, CFG)))
    ids, solo = _solo(eng, req)
    first, last = chunks[0], chunks[-1]
    assert first.usage.prompt_tokens == len(ids) and first.replica == "rep-1"
    assert first.queue_depth == 1 and first.tokens >= 1
    assert last.is_last and last.finish_reason == solo.finish_reason
    assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == len(solo.token_ids)
    assert last.stats["drafted"] > 0 and last.stats["new_tokens"] == len(solo.token_ids)
    assert "".join(c.text for c in chunks) == solo.text
    assert [c.is_last for c in chunks].count(True) == 1
    assert eng.drafts == [CFG] and rep._thread.name == "knnssd-decode"
    assert rep.queue_depth == 0 and rep.served == 1
    assert rep.info()["device"] == "cpu" and rep.info()["max_running"] == AppConfig().runtime.max_running
    rep.shutdown()


def test_plain_when_speculation_is_off():
    # decided once, by the replica's route step (the router is not asked); a given config is decoded as is
    eng = FakeEngine()
    router = FakeRouterHandle()
    rh = FakeReplicaHandle(ModelReplica(AppConfig(), engine=eng, threads=1, router=router))
    be = RayBackend(rh, ["smollm2"])
    chunks = asyncio.run(_collect(be.stream(_req(speculative=False))))
    asyncio.run(_collect(rh.replica.generate(_req(), DraftConfig.plain())))
    assert eng.drafts == [DraftConfig.plain(), DraftConfig.plain()] and router.calls == 0
    assert chunks[0].route.config_id == chunks[-1].route.config_id == "plain" and not chunks[0].route.fallback
    rh.replica.shutdown()


def test_replica_decodes_concurrent_requests_together_with_their_solo_output():
    eng = FakeEngine(delay=0.002)
    rep = ModelReplica(AppConfig(), engine=eng, threads=1)
    reqs = [_req(prompt=p, n=10 + 3 * i) for i, p in enumerate(["a b c", "d e f g h i", "j k"])]

    async def main():
        return await asyncio.gather(*(_collect(rep.generate(r, CFG)) for r in reqs))

    results = asyncio.run(main())
    for r, chunks in zip(reqs, results):
        assert "".join(c.text for c in chunks) == _solo(eng, r)[1].text
    assert max(c[-1].stats["max_batch"] for c in results) == 3  # decoded together, not one at a time
    assert sorted(r[0].queue_depth for r in results)[-1] >= 2
    assert rep.queue_depth == 0
    rep.shutdown()


def test_replica_abandoned_stream_frees_its_slot():
    eng = FakeEngine(delay=0.005)
    rep = ModelReplica(AppConfig(), engine=eng, threads=1)

    async def main():
        agen = rep.generate(_req(n=50), CFG)
        await agen.__anext__()
        await agen.__anext__()
        await agen.aclose()  # the client went away
        return await _collect(rep.generate(_req(n=2), CFG))

    second = asyncio.run(main())
    assert second[-1].usage.completion_tokens == 2
    for _ in range(100):
        if rep.queue_depth == 0:
            break
        time.sleep(0.01)
    assert rep.queue_depth == 0 and rep.served == 1
    rep.shutdown()


def test_replica_full_queue_is_a_503_with_retry_after():
    from services.errors import ServiceUnavailable

    cfg = AppConfig(runtime={"max_running": 1, "max_waiting": 0})
    rep = ModelReplica(cfg, engine=FakeEngine(delay=0.01), threads=1)

    async def main():
        first = rep.generate(_req(n=40), CFG)
        await first.__anext__()  # decoding: the only slot is taken
        with pytest.raises(ServiceUnavailable) as info:
            await _collect(rep.generate(_req(n=2), CFG))
        await first.aclose()
        return info.value

    err = asyncio.run(main())
    assert err.status == 503 and int(err.headers["retry-after"]) >= 1
    rep.shutdown()


def test_replica_bad_messages_are_a_400():
    rep = ModelReplica(AppConfig(), engine=FakeEngine(), threads=1)
    req = BackendRequest(request_id="r", tenant="t", model="m", sampling=SamplingParams(),
                         messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(InvalidRequest):
        asyncio.run(_collect(rep.generate(req, CFG)))
    assert rep.queue_depth == 0
    rep.shutdown()


def test_replica_prompt_too_long_crosses_processes_as_a_400():
    import pickle

    from services.errors import PromptTooLong

    rep = ModelReplica(AppConfig(), engine=FakeEngine(max_seq_len=100), threads=1)
    with pytest.raises(PromptTooLong) as info:
        asyncio.run(_collect(rep.generate(_req(prompt="w " * 74 + "w"), CFG)))
    back = pickle.loads(pickle.dumps(info.value))  # what Ray does with a deployment's exception
    assert type(back) is PromptTooLong and back.status == 400 and back.code == "context_length_exceeded"
    assert "150" in back.message and rep.queue_depth == 0
    rep.shutdown()


def test_the_tenant_prompt_limit_is_checked_on_the_replica_exact_count_before_model_work():
    """The gateway loads no tokenizer: the limit travels with the request and the replica, which tokenises
    once, refuses on the exact count, before routing or decoding; the count it reports is that count."""
    from services.errors import PromptTooLong

    eng = FakeEngine()
    router = FakeRouterHandle()
    rep = ModelReplica(AppConfig(), engine=eng, threads=1, router=router)
    prompt = "w " * 30
    n = len(eng.encode_prompt(prompt=prompt))
    with pytest.raises(PromptTooLong) as info:
        asyncio.run(_collect(rep.generate(_req(prompt=prompt, max_prompt_tokens=n - 1))))
    assert info.value.status == 400 and info.value.param == "prompt"
    assert f"at most {n - 1} tokens" in info.value.message and f"has {n} tokens" in info.value.message
    assert router.calls == 0 and eng.drafts == [] and rep.queue_depth == 0
    chunks = asyncio.run(_collect(rep.generate(_req(prompt=prompt, max_prompt_tokens=n))))
    assert chunks[0].usage.prompt_tokens == n and router.calls == 1
    msgs = [{"role": "user", "content": prompt}]
    with pytest.raises(PromptTooLong) as info:
        asyncio.run(_collect(rep.generate(BackendRequest(request_id="r", tenant="t", model="m", sampling=SamplingParams(),
                                                         messages=msgs, max_prompt_tokens=3))))
    assert info.value.param == "messages"
    rep.shutdown()


def test_replica_streams_coalesced_chunks_with_the_same_text_and_counts():
    """Decoding steps arriving within `stream_chunk_ms` go as one chunk (one Ray message), the first at once;
    with a zero window each step is its own chunk. Text and counts are the same either way."""
    req = _req(n=24)
    out = {}
    for ms in (0.0, 10_000.0):
        eng = FakeEngine(delay=0.002)
        cfg = AppConfig(generation={"stream_chunk_ms": ms, "stream_chunk_tokens": 8})
        rep = ModelReplica(cfg, engine=eng, threads=1)
        out[ms] = asyncio.run(_collect(rep.generate(req, DraftConfig.plain())))
        rep.shutdown()
    ids, solo = _solo(eng, req)
    for chunks in out.values():
        assert "".join(c.text for c in chunks) == solo.text
        assert sum(c.tokens for c in chunks) == chunks[-1].usage.completion_tokens == len(solo.token_ids)
        assert chunks[0].tokens == 1 and chunks[0].usage.prompt_tokens == len(ids)
    assert len(out[0.0]) == len(solo.token_ids)  # plain decoding: one token a step
    coalesced = out[10_000.0]
    assert [c.tokens for c in coalesced[:-1]] == [1] + [8] * (len(coalesced) - 2)  # by count, under a long window
    assert len(coalesced) <= 2 + len(solo.token_ids) // 8


def test_coalesce_merges_by_window_and_ends_with_the_last_step():
    from services.replica import coalesce

    async def main():
        q: asyncio.Queue = asyncio.Queue()
        for i in range(5):
            q.put_nowait(([i], str(i), None, None))
        got = []
        agen = coalesce(q, 100, 0.05)
        got.append(await agen.__anext__())  # the first step alone, at once
        got.append(await agen.__anext__())  # the four queued, then the window runs out
        q.put_nowait(([5], "5", None, None))
        q.put_nowait(([6, 7], "67", "stop", {"new_tokens": 8}))
        q.put_nowait(([9], "x", None, None))  # never read: the request has finished
        got.append(await agen.__anext__())
        got.extend([c async for c in agen])
        return got

    assert asyncio.run(main()) == [(1, "0", None, None), (4, "1234", None, None), (3, "567", "stop", {"new_tokens": 8})]


# ---------------------------------------------------------------- router service


@dataclass
class FakeStats:
    redis_errors: int = 0
    redis_skipped: int = 0

    def snapshot(self):
        return {"redis_errors": self.redis_errors}


@dataclass
class FakeSource:
    version: str = "v1"
    pins: dict = field(default_factory=dict)

    def current(self, tenant=None):
        return self

    def pin(self, tenant, version):
        if version == "missing":
            raise RuntimeError("no such version")
        self.pins[tenant] = version

    def unpin(self, tenant):
        self.pins.pop(tenant, None)


class FakeRouter:
    def __init__(self):
        self.source = FakeSource()
        self.stats = FakeStats()
        self.cache = object()
        self.calls = []

    def route(self, prompt=None, *, messages=None, tenant="default"):
        from router.decision import RouteDecision

        self.calls.append((prompt, messages, tenant))
        if prompt == "redis down":
            self.stats.redis_errors += 1
        return RouteDecision(domain="code", config=CFG, similarity=0.8, index_version="v1", cached=True)

    def close(self):
        pass


def test_router_service_answers_config_and_route_info():
    fr = FakeRouter()
    svc = RouterService(AppConfig(), router=fr)
    routed = asyncio.run(svc.route("write code", None, "acme", None))
    assert routed.config == CFG and routed.similarity == 0.8
    assert routed.info.domain == "code" and routed.info.config_id == CFG.config_id and routed.info.index_version == "v1"
    assert routed.info.cache_hit is True and routed.info.redis_error is False
    assert asyncio.run(svc.route("redis down")).info.redis_error is True
    msgs = [{"role": "user", "content": "hi"}]
    asyncio.run(svc.route(None, msgs, "acme"))
    assert fr.calls[-1] == (None, msgs, "acme")


def test_router_service_pins_tenants_and_survives_a_bad_pin():
    fr = FakeRouter()
    svc = RouterService(AppConfig(), router=fr)
    svc.route_sync("p", tenant="a", index_version="v0")
    assert fr.source.pins == {"a": "v0"}
    svc.route_sync("p", tenant="a", index_version=None)
    assert fr.source.pins == {}
    svc.route_sync("p", tenant="b", index_version="missing")  # logged, routed with the current version
    assert fr.source.pins == {} and len(fr.calls) == 3


def test_router_key_prefix_matches_the_index_publisher():
    assert router_key_prefix("knnssd:") == ""
    assert router_key_prefix("test:ab:knnssd:") == "test:ab:"
    assert router_key_prefix("test:ab:") == "test:ab:"


# ---------------------------------------------------------------- Ray backend over fake handles


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeRouterHandle:
    def __init__(self, fail=False):
        self.fail = fail
        self.calls = 0
        self.route = _Remote(self._route)

    async def _route(self, prompt, messages, tenant, version):
        self.calls += 1
        if self.fail:
            raise RuntimeError("router down")
        return Routed(config=CFG, info=ROUTE)


class FakeGen:
    def __init__(self, agen):
        self.agen = agen
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    def cancel(self):
        self.cancelled = True


class FakeReplicaHandle:
    def __init__(self, replica):
        self.replica = replica
        self.gens = []
        self.stream = None
        self.generate = _Remote(self._generate)

    def options(self, stream=False):
        self.stream = stream
        return self

    def _generate(self, req):
        self.calls = getattr(self, "calls", 0) + 1
        g = FakeGen(self.replica.generate(req))
        self.gens.append(g)
        return g


def test_ray_backend_makes_one_call_and_the_replica_routes():
    eng = FakeEngine()
    router = FakeRouterHandle()
    rh = FakeReplicaHandle(ModelReplica(AppConfig(), engine=eng, threads=1, router=router))
    be = RayBackend(rh, ["smollm2"])
    chunks = asyncio.run(_collect(be.stream(_req(n=2))))
    assert rh.stream is True and rh.calls == 1 and router.calls == 1 and eng.drafts == [CFG]
    assert chunks[0].route == ROUTE and chunks[-1].is_last and not rh.gens[0].cancelled
    assert chunks[-1].route == ROUTE  # the replica attaches the route; it never travels through the gateway
    assert be.models() == ["smollm2"]


def test_replica_decodes_plain_when_routing_fails_or_is_off():
    eng = FakeEngine()
    router = FakeRouterHandle(fail=True)
    rep = ModelReplica(AppConfig(), engine=eng, threads=1, router=router)
    chunks = asyncio.run(_collect(rep.generate(_req(n=2))))
    assert eng.drafts == [DraftConfig.plain()] and rep.route_failures == 1
    assert chunks[0].route.fallback and chunks[0].route.config_id == "plain"
    asyncio.run(_collect(rep.generate(_req(n=2, speculative=False))))
    assert rep.route_failures == 1 and router.calls == 1  # not even asked
    rep.shutdown()


def test_ray_backend_cancels_an_abandoned_replica_call():
    rh = FakeReplicaHandle(ModelReplica(AppConfig(), engine=FakeEngine(), threads=1, router=FakeRouterHandle()))
    be = RayBackend(rh, ["smollm2"])

    async def main():
        agen = be.stream(_req(n=20))
        await agen.__anext__()
        await agen.aclose()

    asyncio.run(main())
    assert rh.gens[0].cancelled


# ---------------------------------------------------------------- ingress and Serve config


def test_gateway_ingress_builds_the_app_with_injected_collaborators():
    from services.app import GatewayIngress
    from services.metrics import ServiceMetrics
    from services.tenants import Tenant, TenantStore

    tenant, key = Tenant.create("t")
    ing = GatewayIngress(AppConfig(), FakeReplicaHandle(None),
                         tenants=TenantStore(None, tenants=[tenant]), limiter=None, usage=None, metrics=ServiceMetrics())
    app = ing.__serve_build_asgi_app__()
    paths = {r.path for r in app.routes}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= paths


def test_build_app_binds_three_deployments_from_the_config():
    from services.app import build_app

    cfg = AppConfig()
    app = build_app({"config": cfg.model_dump(mode="json")})
    ingress = app._bound_deployment
    assert ingress.name == "Gateway" and ingress.max_ongoing_requests == 64
    (replica,) = (a._bound_deployment for a in ingress.init_args[1:])  # the gateway calls the replica only...
    router = replica.init_kwargs["router"]._bound_deployment  # ...which calls the router
    names = {d.name: d for d in (replica, router)}
    assert set(names) == {"Router", "ModelReplica"}
    assert names["ModelReplica"].max_ongoing_requests == cfg.deployments.replica.max_ongoing_requests
    assert names["ModelReplica"].ray_actor_options["num_cpus"] == 1.0


def test_default_index_root(monkeypatch, tmp_path):
    from index import artefact
    from services.routing import default_index_root, resolve_index_root

    monkeypatch.setenv("KNNSSD_INDEX", str(tmp_path))
    assert default_index_root() == tmp_path
    monkeypatch.delenv("KNNSSD_INDEX")
    assert default_index_root() == artefact.DEFAULT_ROOT
    assert resolve_index_root(AppConfig(index_path=str(tmp_path / "x"))) == tmp_path / "x"
    assert resolve_index_root(AppConfig()) == default_index_root()
