"""Issue 22, finding 3, the logic alone (the real replica restart is tests/integration/test_hardening_second.py):
`RayBackend` never lets a request wait for a replica that is not there. Small fakes of the handles' call
shape and an injected probe."""

from __future__ import annotations

import asyncio

import pytest

from engine.config import SamplingParams
from services.backend import BackendChunk, BackendRequest, RouteInfo, Usage
from services.errors import ServiceUnavailable
from services.ray_backend import RayBackend


class Gen:
    """A stream whose first chunk comes when `release` is set."""

    def __init__(self, release: asyncio.Event) -> None:
        self.release = release
        self.cancelled = False
        self.sent = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.sent:
            raise StopAsyncIteration
        await self.release.wait()
        self.sent = True
        return BackendChunk(text="ok", tokens=1, usage=Usage(1, 1), finish_reason="stop",
                            route=RouteInfo(config_id="plain"))  # the replica attaches the route

    def cancel(self) -> None:
        self.cancelled = True


class Replica:
    def __init__(self) -> None:
        self.gens: list[Gen] = []
        self.release = asyncio.Event()
        self.generate = self

    def options(self, stream=False):
        return self

    def remote(self, req):
        self.gens.append(Gen(self.release))
        return self.gens[-1]


def _req() -> BackendRequest:
    return BackendRequest(request_id="r", tenant="t", model="m", sampling=SamplingParams(max_new_tokens=1), prompt="x")


async def _collect(agen):
    return [c async for c in agen]


def test_no_replica_serving_is_503_at_once_without_any_work():
    async def main():
        replica = Replica()
        be = RayBackend(replica, ["m"], probe=lambda: (False, "the replica died"))
        with pytest.raises(ServiceUnavailable) as exc:
            await asyncio.wait_for(_collect(be.stream(_req())), timeout=5)
        assert exc.value.code == "replica_unavailable" and exc.value.headers["retry-after"] == "5"
        assert "the replica died" in exc.value.message
        assert replica.gens == [] and be.refused_no_replica == 1

    asyncio.run(main())


def test_a_request_waiting_for_a_replica_that_dies_is_answered_503():
    async def main():
        state = {"ok": True}
        replica = Replica()
        be = RayBackend(replica, ["m"], probe=lambda: (state["ok"], None if state["ok"] else "gone"))
        be.WATCH_S = be.HEALTH_CACHE_S = 0.05
        task = asyncio.ensure_future(_collect(be.stream(_req())))
        await asyncio.sleep(0.2)  # queued for the replica: no first chunk yet
        assert not task.done()
        state["ok"] = False
        with pytest.raises(ServiceUnavailable):
            await asyncio.wait_for(task, timeout=5)
        assert replica.gens[0].cancelled  # the queued call is withdrawn

    asyncio.run(main())


def test_a_busy_but_living_replica_is_waited_for():
    async def main():
        replica = Replica()
        be = RayBackend(replica, ["m"], probe=lambda: (True, None))
        be.WATCH_S = be.HEALTH_CACHE_S = 0.05
        task = asyncio.ensure_future(_collect(be.stream(_req())))
        await asyncio.sleep(0.3)
        replica.release.set()
        chunks = await asyncio.wait_for(task, timeout=5)
        assert [c.text for c in chunks] == ["ok"] and chunks[0].route.config_id == "plain"

    asyncio.run(main())


def test_scale_from_zero_and_a_failing_probe_let_requests_through():
    async def main():
        for kw in ({"probe": lambda: (False, "zero replicas"), "wait_for_replica": True},
                   {"probe": lambda: 1 / 0}):
            replica = Replica()
            replica.release.set()
            be = RayBackend(replica, ["m"], **kw)
            chunks = await asyncio.wait_for(_collect(be.stream(_req())), timeout=5)
            assert [c.text for c in chunks] == ["ok"], kw

    asyncio.run(main())


def test_health_says_why():
    async def main():
        be = RayBackend(Replica(), ["m"], probe=lambda: (False, "no ModelReplica replica is running"))
        assert await be.available() == (False, "no ModelReplica replica is running")

    asyncio.run(main())
