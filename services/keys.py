"""Redis key names, in one place: every key and channel the service and the router use.

The convention: a deployment's namespace is `AppConfig.redis_prefix` (default "knnssd:"), and every name
is that namespace followed by the name below. The service's stores build their names here:

    {ns}tenants                 hash: tenant name -> tenant JSON (services.tenants)
    {ns}tenant_keys             hash: key id -> tenant name
    {ns}tenants:events          pub/sub: tenant added / removed
    {ns}rl:{<tenant id>}:req    sorted set: the tenant's requests in the window (services.limits)
    {ns}rl:{<tenant id>}:tok    sorted set: the tenant's tokens in the window
    {ns}usage:{tenant id}       hash: the tenant's totals (services.usage)
    {ns}usage:{tenant id}:{day} hash: the tenant's totals of one UTC day (expiring)

The router's names (`knnssd:index:current` and `knnssd:index:updates` from `index.publish`, written by
`python -m index.job --redis-url`, and the decision cache `knnssd:route:...` of `router.cache`) carry
"knnssd:" themselves, so the router is given the part of the namespace before it (`router_prefix`):
with the default namespace that is "", and the service reads exactly the key the index job publishes.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "knnssd:"
ROUTER_NAMESPACE = "knnssd:"  # what the router's own key names start with (index.publish, router.cache)


def router_key_prefix(namespace: str) -> str:
    """The router's key prefix for a deployment namespace (see the module docstring)."""
    return namespace[: -len(ROUTER_NAMESPACE)] if namespace.endswith(ROUTER_NAMESPACE) else namespace


@dataclass(frozen=True, slots=True)
class Keys:
    """The names under one namespace (`AppConfig.redis_prefix`)."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def tenants(self) -> str:
        return self.namespace + "tenants"

    @property
    def tenant_keys(self) -> str:
        return self.namespace + "tenant_keys"

    @property
    def tenant_events(self) -> str:
        return self.namespace + "tenants:events"

    def rate(self, tenant_id: str) -> tuple[str, str]:
        """(requests, tokens) of one tenant's rate window; the braces keep both in one Redis Cluster slot."""
        base = f"{self.namespace}rl:{{{tenant_id}}}"
        return base + ":req", base + ":tok"

    def usage(self, tenant_id: str, day: str | None = None) -> str:
        """A tenant's usage totals, or those of one day (`YYYY-MM-DD`)."""
        base = f"{self.namespace}usage:{tenant_id}"
        return base if day is None else f"{base}:{day}"

    @property
    def router_prefix(self) -> str:
        return router_key_prefix(self.namespace)
