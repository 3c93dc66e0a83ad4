"""The gateway's `Backend` over Ray Serve deployment handles: route on the Router, decode on a ModelReplica.

Per request: `route(req)` -> `Routed` (draft config + route info), then a streaming call
`replica.options(stream=True).generate.remote(req, config)` whose `BackendChunk`s are passed through as
they come, with the route info attached to the first and the last (the replica gets the draft config
only). `route` is the one place that decides plain decoding: a request with `speculative: false` is not
routed at all. Routing is an optimisation: if the Router deployment fails or cannot be reached, the
request is decoded without speculation (same output) and the route says so (config "plain", fallback).
A replica that cannot take the request surfaces as Serve's back-pressure error, which the gateway maps to 503.
If the caller stops reading (client gone), the replica call is cancelled so its decode stops. A replica
that dies under a request surfaces as Ray's actor error, which the gateway maps to 503 + Retry-After;
`available()` asks Serve's controller whether any ModelReplica is running (for /health).

The handles are injected, so tests drive this class with small fakes of the same call shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from services.backend import BackendChunk, BackendRequest
from services.routing import Routed

log = logging.getLogger(__name__)


class RayBackend:
    """`services.backend.Backend` over a Router handle and a ModelReplica handle."""

    def __init__(self, router: Any, replica: Any, models: list[str]) -> None:
        self.router = router
        self.replica = replica
        self._models = list(models)
        self.route_failures = 0

    HEALTH_CACHE_S = 1.0  # /health may be polled often; the controller is asked at most this often

    def models(self) -> list[str]:
        return list(self._models)

    async def available(self) -> tuple[bool, str | None]:
        """(True, None) when at least one replica of the model deployment is running, else (False, why)."""
        now = time.monotonic()
        cached = getattr(self, "_health", None)
        if cached is not None and now - cached[0] < self.HEALTH_CACHE_S:
            return cached[1]
        result = await asyncio.to_thread(self._running_replicas)
        self._health = (now, result)
        return result

    async def replica_info(self) -> dict | None:
        """What a model replica runs on (device, dtype, load), from one replica; None if it cannot say."""
        now = time.monotonic()
        cached = getattr(self, "_info", None)
        if cached is not None and now - cached[0] < self.HEALTH_CACHE_S:
            return cached[1]
        try:
            info = await asyncio.wait_for(self.replica.info.remote(), timeout=2.0)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - informational only
            log.debug("replica info unavailable", exc_info=True)
            info = None
        self._info = (now, info)
        return info

    def _running_replicas(self) -> tuple[bool, str | None]:
        from ray import serve

        app, name = self.replica.app_name, self.replica.deployment_name
        status = serve.status().applications.get(app)
        deployment = status.deployments.get(name) if status is not None else None
        if deployment is None:
            return False, f"deployment {name} of application {app} not found"
        states = {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}
        if states.get("RUNNING", 0) > 0:
            return True, None
        return False, f"no {name} replica is running ({deployment.status}: {states or 'none'})"

    async def route(self, req: BackendRequest) -> Routed:
        """The draft config and route info for `req`: plain when it turns speculation off, else the Router's."""
        if not req.speculative:  # no draft config is needed; skip the embedding
            return Routed.plain()
        try:
            return await self.router.route.remote(req.prompt, req.messages, req.tenant, req.index_version)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - routing only changes speed; decode plain rather than fail
            self.route_failures += 1
            log.warning("routing request %s failed; decoding it without speculation", req.request_id, exc_info=True)
            return Routed.plain(fallback=True)

    async def stream(self, req: BackendRequest) -> AsyncIterator[BackendChunk]:
        routed = await self.route(req)
        gen = self.replica.options(stream=True).generate.remote(req, routed.config)
        finished, first = False, True
        try:
            async for chunk in gen:
                finished = chunk.is_last
                if first or finished:  # the gateway reads the route from these (services.backend)
                    chunk.route = routed.info
                    first = False
                yield chunk
                if finished:
                    return
            finished = True
        finally:
            if not finished:
                gen.cancel()
