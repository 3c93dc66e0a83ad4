"""The Serve application builder: the only place that applies `serve.deployment` and `.bind`.

    Gateway (FastAPI ingress)  --handle-->  ModelReplica  (ModelReplica: tokenise, route, decode, stream chunks)
                                              --handle-->  Router  (RouterService: embed + KNN -> DraftConfig)

One Ray call per request from the gateway: the replica reads the prompt and asks the router itself.

`build_app(args)` is the `import_path` target of the Serve config (`services.app:build_app`); `args` is
`{"config": <AppConfig as a dict>}` (see `AppConfig.serve_applications`), or an AppConfig. Each
deployment's name, replicas or autoscaling, `max_ongoing_requests` and `ray_actor_options` come from
`AppConfig.deployments`; a Serve config file's `deployments:` entries override them as usual.

The deployment bodies are plain classes (`GatewayIngress` here, `RouterService`, `ModelReplica`) that
take their collaborators in the constructor and are built and tested without Ray. The gateway's FastAPI
app is built inside its replica by Serve's `__serve_build_asgi_app__` hook (Redis clients and Prometheus
registries are per process, so they must not be pickled from the driver).
"""

from __future__ import annotations

import logging
from typing import Any

from services.config import AppConfig
from services.ray_backend import RayBackend
from services.replica import ModelReplica
from services.routing import RouterService

log = logging.getLogger(__name__)


def _config(args: Any) -> AppConfig:
    if args is None:
        return AppConfig()
    if isinstance(args, AppConfig):
        return args
    if isinstance(args, dict):
        data = args.get("config", args)
        return AppConfig.model_validate(data or {})
    raise TypeError(f"build_app takes an AppConfig or {{'config': {{...}}}}, not {type(args).__name__}")


class GatewayIngress:
    """The ingress deployment's body: the OpenAI gateway over a `RayBackend` of the replica handle.

    Collaborators not given (tenants, limiter, usage, metrics) are built from the config in
    `build_asgi_app`, i.e. in the process that serves HTTP.
    """

    def __init__(self, config: AppConfig | dict, replica: Any, **collaborators: Any) -> None:
        self.config = _config(config)
        scaling = self.config.deployments.replica.autoscaling_config
        # a scale-from-zero deployment starts a replica because a request waits for one; others answer 503
        # at once while no replica serves (services.ray_backend)
        self.backend = RayBackend(replica, [self.config.model],
                                  wait_for_replica=scaling is not None and scaling.min_replicas == 0)
        self.collaborators = collaborators
        self._redis = None
        self._tenants = None

    def build_asgi_app(self):
        from services.gateway import build_gateway_app
        from services.limits import RateLimiter
        from services.metrics import ServiceMetrics
        from services.tenants import TenantStore, load_tenants_file
        from services.usage import UsageStore

        c = self.config
        got = self.collaborators
        if not {"tenants", "limiter", "usage"} <= got.keys():
            self._redis = c.redis_client()
        tenants = got.get("tenants") or TenantStore(
            self._redis,
            prefix=c.redis_prefix,
            tenants=load_tenants_file(c.tenants_file) if c.tenants_file else (),
            cache_s=c.tenant_cache_s,
        ).watch()  # follows removals published by `knnssd tenants remove`, on every gateway replica at once
        self._tenants = tenants
        limiter = got["limiter"] if "limiter" in got else RateLimiter(
            self._redis, c.redis_prefix, window_s=c.limits.window_s, fail_open=c.limits.fail_open
        )
        usage = got["usage"] if "usage" in got else UsageStore(self._redis, c.redis_prefix)
        metrics = got.get("metrics") or ServiceMetrics()
        return build_gateway_app(self.backend, tenants, limiter, usage, metrics, c)

    # Serve's late-bound ingress hook (Ray >= 2.60): called in the replica after __init__.
    def __serve_build_asgi_app__(self):
        return self.build_asgi_app()

    def __del__(self) -> None:  # Serve's replica shutdown hook
        tenants = getattr(self, "_tenants", None)
        if tenants is not None and hasattr(tenants, "close"):
            tenants.close()
        client = getattr(self, "_redis", None)
        if client is not None:
            client.close()


def build_app(args: Any = None):
    """Bind Gateway -> ModelReplica -> Router into one Serve application (the `import_path` target)."""
    from ray import serve

    config = _config(args)
    d = config.deployments
    router = serve.deployment(RouterService, **d.router.serve_options()).bind(config)
    replica = serve.deployment(ModelReplica, **d.replica.serve_options()).bind(config, router=router)
    ingress = serve.ingress()(GatewayIngress)
    return serve.deployment(ingress, **d.gateway.serve_options()).bind(config, replica)
