"""The gateway's `Backend` over a Ray Serve deployment handle: one streaming call to a ModelReplica per request.

Per request: `replica.options(stream=True).generate.remote(req)`, whose `BackendChunk`s are passed through
as they come. The replica does the rest of the request path (services.replica): it tokenises the prompt
(the one tokenisation; its exact count and the tenant's limit are checked there), asks the Router
deployment for the draft config (plain when the request turns speculation off or routing fails), attaches
the route to the first and last chunks, and coalesces decoding steps into few chunks. So the gateway makes
one Ray round trip per request and the route never travels through it.
A replica that cannot take the request surfaces as Serve's back-pressure error, which the gateway maps to 503.
If the caller stops reading (client gone), the replica call is cancelled so its decode stops. A replica
that dies under a request surfaces as Ray's actor error, which the gateway maps to 503 + Retry-After.

No request waits for a replica that is not there: `available()` (also /health) says whether a model replica
is serving, from Serve's controller (replicas RUNNING) checked against Ray's own record of live actors, which
learns of a dead replica within a fraction of a second where the controller takes its next health check
(up to ~10 s). A request arriving while no replica serves (it died, or is restarting and loading the model)
gets 503 + Retry-After at once instead of waiting for the restart, and one already waiting for its first
chunk is answered 503 as soon as that becomes true. A deployment that may scale to zero replicas
(`min_replicas: 0`) is the exception: there, a request is what makes Serve start a replica, so it waits.

The handles are injected, so tests drive this class with small fakes of the same call shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from services.backend import BackendChunk, BackendRequest
from services.errors import REPLICA_RESTART_RETRY_S, ServiceUnavailable

log = logging.getLogger(__name__)

# () -> (a replica can serve, why not); blocking (it asks Ray), so it runs in a thread
ReplicaProbe = Callable[[], tuple[bool, str | None]]


class RayBackend:
    """`services.backend.Backend` over a ModelReplica handle.

    `probe` tells whether a model replica is serving (default: `serve_replicas_probe` of the replica
    handle); `wait_for_replica` True sends requests on even when none is (scale-from-zero deployments)."""

    def __init__(self, replica: Any, models: list[str], *, probe: ReplicaProbe | None = None,
                 wait_for_replica: bool = False) -> None:
        self.replica = replica
        self._models = list(models)
        self.probe: ReplicaProbe = probe or (lambda: serve_replicas_probe(replica))
        self.wait_for_replica = wait_for_replica
        self.refused_no_replica = 0

    HEALTH_CACHE_S = 0.5  # /health and requests may come often; Ray is asked at most this often
    WATCH_S = 0.25  # how often a call waiting for a replica checks that one still serves
    INFO_TIMEOUT_S = 2.0  # /health's question to a replica (device, load) is given up after this

    def models(self) -> list[str]:
        return list(self._models)

    async def available(self) -> tuple[bool, str | None]:
        """(True, None) when at least one replica of the model deployment is running, else (False, why)."""
        now = time.monotonic()
        cached = getattr(self, "_health", None)
        if cached is not None and now - cached[0] < self.HEALTH_CACHE_S:
            return cached[1]
        result = await asyncio.to_thread(self.probe)
        self._health = (now, result)
        return result

    async def _serving(self) -> tuple[bool, str | None]:
        """For the request path: like `available()`, but a probe that fails lets the request through (the
        replica call then fails or succeeds on its own), and scale-from-zero deployments always pass."""
        if self.wait_for_replica:
            return True, None
        try:
            return await self.available()
        except Exception:  # noqa: BLE001 - the probe is an optimisation here, never a new way to fail
            log.debug("replica probe failed; sending the request on", exc_info=True)
            return True, None

    def _no_replica(self, why: str | None) -> ServiceUnavailable:
        self.refused_no_replica += 1
        return ServiceUnavailable(
            "No model replica is serving right now (" + (why or "none is running")
            + "); Serve restarts a replica that died. Retry shortly.",
            code="replica_unavailable", retry_after_s=REPLICA_RESTART_RETRY_S,
        )

    async def replica_info(self) -> dict | None:
        """What a model replica runs on (device, dtype, load), from one replica; None if it cannot say."""
        now = time.monotonic()
        cached = getattr(self, "_info", None)
        if cached is not None and now - cached[0] < self.HEALTH_CACHE_S:
            return cached[1]
        call = asyncio.ensure_future(_awaited(self.replica.info.remote()))
        info = None
        try:  # a replica that died a moment ago still takes the call: stop waiting once Ray knows
            for _ in range(int(self.INFO_TIMEOUT_S / self.WATCH_S)):
                done, _ = await asyncio.wait({call}, timeout=self.WATCH_S)
                if done:
                    info = call.result()
                    break
                if not (await self.available())[0]:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - informational only
            log.debug("replica info unavailable", exc_info=True)
        finally:
            if not call.done():
                call.cancel()
        self._info = (now, info)
        return info

    async def stream(self, req: BackendRequest) -> AsyncIterator[BackendChunk]:
        ok, why = await self._serving()
        if not ok:  # at once: a restarting replica takes as long as loading the model
            raise self._no_replica(why)
        gen = self.replica.options(stream=True).generate.remote(req)
        finished = False
        try:
            if not self.wait_for_replica:
                chunk = await self._first_chunk(gen)
                if chunk is None:
                    finished = True
                    return
                finished = chunk.is_last
                yield chunk
                if finished:
                    return
            async for chunk in gen:
                finished = chunk.is_last
                yield chunk
                if finished:
                    return
            finished = True
        finally:
            if not finished:
                gen.cancel()

    async def _first_chunk(self, gen: Any) -> BackendChunk | None:
        """The stream's first chunk (None if it ends at once), or 503 as soon as no replica serves while
        waiting for it (the request is queued for a replica that died, or one that is still loading)."""
        nxt = asyncio.ensure_future(gen.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=self.WATCH_S)
                if done:
                    try:
                        return nxt.result()
                    except StopAsyncIteration:
                        return None
                ok, why = await self._serving()
                if not ok:
                    raise self._no_replica(why)
        finally:
            if not nxt.done():
                nxt.cancel()


async def _awaited(response: Any) -> Any:
    return await response


def serve_replicas_probe(handle: Any) -> tuple[bool, str | None]:
    """(True, None) when a replica of the handle's deployment is RUNNING for Serve's controller and its actor
    is alive for Ray, else (False, why). The controller notices a dead replica only at its next health check
    (up to ~10 s later); Ray's actor table knows at once, and a restarted replica counts only once RUNNING
    (its model loaded). Falls back to the controller's counts if its replica details cannot be read."""
    app, name = handle.app_name, handle.deployment_name
    import ray
    from ray import serve

    try:
        from ray.serve.context import _get_global_client  # the replica list; Serve has no public call for it

        details = _get_global_client().get_serve_details()
        replicas = details["applications"][app]["deployments"][name]["replicas"]
    except KeyError:
        return False, f"deployment {name} of application {app} not found"
    except Exception:  # noqa: BLE001 - a Ray without these internals: the controller's counts alone
        log.debug("Serve replica details unavailable; using serve.status()", exc_info=True)
        status = serve.status().applications.get(app)
        deployment = status.deployments.get(name) if status is not None else None
        if deployment is None:
            return False, f"deployment {name} of application {app} not found"
        states = {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}
        if states.get("RUNNING", 0) > 0:
            return True, None
        return False, f"no {name} replica is running ({deployment.status}: {states or 'none'})"
    running = [r for r in replicas if str(getattr(r["state"], "value", r["state"])) == "RUNNING"]
    if running:
        alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        if any(r.get("actor_name") in alive for r in running):
            return True, None
        return False, f"the {name} replica died; Serve is restarting it"
    states = sorted({str(getattr(r["state"], "value", r["state"])) for r in replicas})
    return False, f"no {name} replica is running ({', '.join(states) or 'none'})"
