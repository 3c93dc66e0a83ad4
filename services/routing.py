"""The router deployment's body: `router.Router` behind an async call that answers with what a replica needs.

`RouterService.route(...)` returns a `Routed` (the `DraftConfig` to decode with plus the `RouteInfo` the
gateway reports), embedding on a worker thread so the replica's event loop stays free. New index versions
arrive through the router's `Reloader` (Redis version key + pub/sub), with no restart; a request keeps
the artefact it started with. A tenant pinned to an index version (`BackendRequest.index_version`) is
routed with that version, loaded once from the index root; a pin that cannot be loaded is logged and the
current version is used instead (routing only changes speed, never output).

Only versions that fit the served model are routed with: the router checks the weights hash, the
embedder and every draft config against the model directory (`served_model`) at start and on each reload,
and keeps the old version when a new one does not fit (`stats()["reload_rejected"]` counts why).

Redis key names follow `services.keys`: the router is given `Keys(AppConfig.redis_prefix).router_prefix`,
so with the default prefix the service reads exactly the key `python -m index.job --redis-url ...` publishes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.config import DraftConfig
from services.backend import RouteInfo
from services.config import AppConfig
from services.keys import Keys

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Routed:
    """What routing decided for one request (crosses Ray processes, so a plain dataclass)."""

    config: DraftConfig
    info: RouteInfo
    similarity: float | None = None

    @classmethod
    def plain(cls, *, fallback: bool = False) -> Routed:
        """Decode without speculation, and say so: config "plain" (`fallback`: routing failed)."""
        config = DraftConfig.plain()
        return cls(config=config, info=RouteInfo(config_id=config.config_id, fallback=fallback))


class RouterLike(Protocol):
    """What RouterService needs from `router.route.Router`."""

    source: Any
    stats: Any

    def route(self, prompt: str | None = None, *, messages: Any = None, tenant: str = "default") -> Any: ...

    def close(self) -> None: ...


def default_index_root() -> Path:
    """The index artefact shipped for the bundled model, used when `AppConfig.index_path` is not set:
    `$KNNSSD_INDEX` if set, else the index stage's `index.artefact.DEFAULT_ROOT` (index/artefacts/default)."""
    env = os.environ.get("KNNSSD_INDEX")
    if env:
        return Path(env).expanduser()
    from index.artefact import DEFAULT_ROOT

    return DEFAULT_ROOT


def resolve_index_root(config: AppConfig) -> Path:
    return Path(config.index_path).expanduser() if config.index_path else default_index_root()


def served_model(config: AppConfig):
    """(ModelSpec, weights hash) of the served model, read from its directory without loading weights."""
    from engine.load import resolve_model_dir, weights_hash
    from router.reload import ModelSpec

    model_dir, _ = resolve_model_dir(config.model_path or config.model)
    return ModelSpec.from_model_dir(model_dir), weights_hash(model_dir)


def router_config(config: AppConfig, index_root: str | Path | None = None):
    """The `RouterConfig` the service runs its router with (derived from AppConfig)."""
    from router.config import RouterConfig

    root = Path(index_root) if index_root is not None else resolve_index_root(config)
    return RouterConfig(
        redis_url=config.redis_url,
        key_prefix=Keys(config.redis_prefix).router_prefix,
        index_root=str(root),
    )


class RouterService:
    """Routes requests for the gateway; holds one `Router` (built from the config unless injected)."""

    def __init__(self, config: AppConfig | dict | None = None, router: RouterLike | None = None) -> None:
        self.config = AppConfig.model_validate(config) if isinstance(config, dict) else (config or AppConfig())
        if router is None:
            from router.route import Router

            spec, model_hash = served_model(self.config)
            rc = router_config(self.config).model_copy(update={"expect_model_hash": model_hash})
            precision = self.config.served_precision()
            log.info("router starting with index root %s (Redis %s, key prefix %r, precision %s)", rc.index_root, rc.redis_url,
                     rc.key_prefix, precision)
            router = Router.from_config(rc)
            try:
                # raises if the index it starts with does not fit the model or was measured at another precision
                router.source.set_model(spec, precision=precision)
            except BaseException:
                router.close()
                raise
        self.router = router
        self._pins: dict[str, str] = {}  # tenant -> pinned version, as applied to the source
        self._bad_pins: set[tuple[str, str]] = set()
        self._pin_lock = threading.Lock()

    # ---------------------------------------------------------------- request path

    async def route(
        self,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        tenant: str = "default",
        index_version: str | None = None,
    ) -> Routed:
        return await asyncio.to_thread(self.route_sync, prompt, messages, tenant, index_version)

    def route_sync(
        self,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        tenant: str = "default",
        index_version: str | None = None,
    ) -> Routed:
        self._apply_pin(tenant, index_version)
        stats = self.router.stats
        errors_before = stats.redis_errors + stats.redis_skipped
        decision = self.router.route(prompt, messages=messages, tenant=tenant)
        # Approximate under concurrency (another request's Redis error may land in this window); it only
        # feeds a counter of requests that routed without Redis.
        redis_error = stats.redis_errors + stats.redis_skipped > errors_before
        info = RouteInfo(
            domain=decision.domain,
            config_id=decision.config_id,
            index_version=decision.index_version,
            fallback=decision.fallback,
            cache_hit=decision.cached if getattr(self.router, "cache", None) is not None else None,
            redis_error=redis_error,
        )
        return Routed(config=decision.config, info=info, similarity=decision.similarity)

    def _apply_pin(self, tenant: str, version: str | None) -> None:
        """Keep the source's pin for `tenant` equal to the tenant's configured index version."""
        if self._pins.get(tenant) == version:
            return
        source = self.router.source
        if not hasattr(source, "pin"):
            return
        with self._pin_lock:
            if self._pins.get(tenant) == version:
                return
            if version is None:
                source.unpin(tenant)
                self._pins.pop(tenant, None)
                return
            if (tenant, version) in self._bad_pins:
                return
            try:
                source.pin(tenant, version)
            except Exception as exc:  # noqa: BLE001 - a bad pin must not fail requests; it only changes speed
                self._bad_pins.add((tenant, version))
                log.warning("tenant %s is pinned to index version %s, which cannot be loaded (%s); "
                            "routing it with the current version", tenant, version, exc)
                return
            self._pins[tenant] = version

    # ---------------------------------------------------------------- operations

    def index_version(self) -> str:
        return self.router.source.current().version

    def stats(self) -> dict[str, Any]:
        rejected = getattr(self.router.source, "rejected", None)
        return {**self.router.stats.snapshot(), "reload_rejected": dict(rejected or {})}

    def check_health(self) -> None:
        self.router.source.current()  # raises if no artefact is loaded

    def shutdown(self) -> None:
        self.router.close()

    def __del__(self) -> None:  # Serve's replica shutdown hook: stop the reload thread, close Redis
        router = getattr(self, "router", None)
        if router is not None:
            try:
                router.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("closing the router failed", exc_info=True)
