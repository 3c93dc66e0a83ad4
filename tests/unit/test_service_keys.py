"""Redis key names (services.keys): unchanged from what existing data and `index.job --redis-url` use."""

from __future__ import annotations

from index.publish import index_key
from services.config import AppConfig
from services.keys import Keys, router_key_prefix


def test_service_key_names():
    k = Keys(AppConfig().redis_prefix)
    assert (k.tenants, k.tenant_keys, k.tenant_events) == ("knnssd:tenants", "knnssd:tenant_keys", "knnssd:tenants:events")
    assert k.rate("t1") == ("knnssd:rl:{t1}:req", "knnssd:rl:{t1}:tok")
    assert (k.usage("t1"), k.usage("t1", "2026-01-02")) == ("knnssd:usage:t1", "knnssd:usage:t1:2026-01-02")


def test_router_reads_what_the_index_job_publishes():
    assert index_key(Keys().router_prefix) == "knnssd:index:current"
    assert index_key(Keys("test:ab:knnssd:").router_prefix) == "test:ab:knnssd:index:current"
    assert router_key_prefix("test:ab:") == "test:ab:"


def test_stores_use_the_convention():
    from services.limits import RateLimiter
    from services.tenants import TenantStore
    from services.usage import UsageStore

    class Client:  # enough of redis.Redis for the constructors
        def register_script(self, script):
            return None

    assert RateLimiter(Client(), "p:")._keys("t") == ["p:rl:{t}:req", "p:rl:{t}:tok"]
    assert UsageStore(Client(), "p:")._key("t") == "p:usage:t"
    store = TenantStore(Client(), "p:")
    assert (store._tenants_key, store._keys_key, store.events_channel) == ("p:tenants", "p:tenant_keys", "p:tenants:events")
