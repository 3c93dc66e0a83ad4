"""Tenants and their API keys: keys are stored only as salted SHA-256 hashes and checked in constant time.

A key is found by its `key_id` (a short hash of the key under a fixed label, so any key string works and
lookup is one step), then verified against `sha256(salt + key)` with `hmac.compare_digest`. Keys are
random 256-bit secrets, so a fast hash is enough; the salt keeps equal keys from hashing equally.

Tenants come from a YAML file (static, read at start) and/or Redis (added and removed at runtime by
`knnssd tenants ...`). Redis layout under the prefix (names from `services.keys`):
    {prefix}tenants       hash  name   -> tenant JSON (no key, only its id, salt and hash)
    {prefix}tenant_keys   hash  key_id -> name
    {prefix}tenants:events  pub/sub channel: {"event": "added"|"removed", "key_id": ...}
A gateway replica trusts a validated key for `cache_s` seconds without asking Redis. `add`/`remove`
publish an event, and each gateway's watcher thread (`TenantStore.watch()`) drops a removed key from its
cache at once and puts it on a local deny-list; the cache time only bounds a removal while that channel
is down. While Redis is unreachable, known keys keep working from the cache, keys on the deny-list get
401, and unknown keys get 503 (the key may well be valid), never 401.

Every tenant has an `id` that is never reused: a tenant removed and added again under the same name gets
a fresh one, and rate-limit windows and usage counters are kept per id, so nothing carries over.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import logging
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import redis
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.errors import ServiceUnavailable
from services.keys import Keys
from services.limits import RedisBreaker, RedisSkipped

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-knnssd-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_id(key: str) -> str:
    """Lookup id of a key: not secret, not enough to verify it (64 bits of a labelled hash)."""
    return hashlib.sha256(b"knnssd-key-id\x00" + key.encode()).hexdigest()[:16]


def hash_key(key: str, salt: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()


class Tenant(BaseModel):
    """A tenant as stored: never the key itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Tenant name: letters, digits, '_', '.', '-'; unique.")
    id: str = Field(
        default_factory=lambda: uuid.uuid4().hex[:16],
        description="Never reused, even for a name added again: limits and usage are kept per id.",
    )
    key_id: str = Field(description="Lookup id of the tenant's key (see key_id()).")
    key_salt: str = Field(description="Hex salt of the key hash.")
    key_hash: str = Field(description="Hex sha256(salt + key).")
    rpm: int | None = Field(None, ge=0, description="Requests per window; None uses the config default, 0 unlimited.")
    tpm: int | None = Field(None, ge=0, description="Tokens per window; None uses the config default, 0 unlimited.")
    index_version: str | None = Field(None, description="Pin requests to this index version; None follows the current.")
    max_concurrent: int | None = Field(
        None, ge=0, description="Requests in flight per gateway replica; None uses the config default, 0 unlimited."
    )
    max_prompt_tokens: int | None = Field(
        None, ge=0, description="Longest prompt in tokens; None uses the config default, 0 only the model's context."
    )
    admin: bool = Field(False, description="The key may also read /metrics.")
    created_at: float = Field(default_factory=time.time, description="Unix time the tenant was added.")

    @model_validator(mode="before")
    @classmethod
    def _legacy_id(cls, data: Any) -> Any:
        # Tenants stored before ids existed: a stable id from what made them unique (a re-add has another
        # created_at, and usually another key), so their windows and usage stay theirs across restarts.
        if isinstance(data, dict) and "id" not in data and "key_id" in data:
            seed = f"{data.get('name')}:{data['key_id']}:{data.get('created_at')!r}"
            data = {**data, "id": "legacy-" + hashlib.sha256(seed.encode()).hexdigest()[:12]}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("tenant names are 1-64 of letters, digits, '_', '.', '-' and start alphanumeric")
        return v

    @classmethod
    def create(
        cls,
        name: str,
        *,
        key: str | None = None,
        **limits: Any,
    ) -> tuple[Tenant, str]:
        """A new tenant (fresh id) and its plaintext key (given, or generated); show the key once, store the
        tenant. `limits`: rpm, tpm, index_version, max_concurrent, max_prompt_tokens, admin."""
        key = key or generate_key()
        salt = secrets.token_hex(16)
        tenant = cls(name=name, key_id=key_id(key), key_salt=salt, key_hash=hash_key(key, salt), **limits)
        return tenant, key

    def verify(self, key: str) -> bool:
        return hmac.compare_digest(hash_key(key, self.key_salt), self.key_hash)

    def public(self) -> dict[str, Any]:
        """What may be shown (CLI list, /v1/usage): no hash material."""
        return {"name": self.name, "rpm": self.rpm, "tpm": self.tpm, "index_version": self.index_version,
                "max_concurrent": self.max_concurrent, "max_prompt_tokens": self.max_prompt_tokens,
                "admin": self.admin, "created_at": self.created_at}


# ------------------------------------------------------------------ tenants file


def load_tenants_file(path: str | os.PathLike[str]) -> list[Tenant]:
    """Read `tenants: [ {name, key_id, key_salt, key_hash, rpm, tpm, index_version}, ... ]`; missing file -> []."""
    p = Path(path)
    if not p.exists():
        return []
    data = yaml.safe_load(p.read_text()) or {}
    items = data.get("tenants", []) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a mapping with a 'tenants' list")
    tenants = [Tenant.model_validate(t) for t in items]
    names = [t.name for t in tenants]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate tenant names")
    return tenants


def save_tenants_file(path: str | os.PathLike[str], tenants: list[Tenant]) -> None:
    """Write atomically (temp file + rename) with owner-only permissions."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"tenants": [t.model_dump(mode="json") for t in tenants]}, sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_tenant_to_file(path: str | os.PathLike[str], name: str, **kw: Any) -> tuple[Tenant, str]:
    tenants = load_tenants_file(path)
    if any(t.name == name for t in tenants):
        raise ValueError(f"tenant {name!r} already exists in {path}")
    tenant, key = Tenant.create(name, **kw)
    save_tenants_file(path, [*tenants, tenant])
    return tenant, key


def remove_tenant_from_file(path: str | os.PathLike[str], name: str) -> bool:
    tenants = load_tenants_file(path)
    kept = [t for t in tenants if t.name != name]
    if len(kept) == len(tenants):
        return False
    save_tenants_file(path, kept)
    return True


# ------------------------------------------------------------------ store

_LOOKUP = """
local name = redis.call('HGET', KEYS[1], ARGV[1])
if not name then return false end
return redis.call('HGET', KEYS[2], name)
"""

_ADD = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
return 1
"""


DENY_LIST_SIZE = 100_000


class TenantStore:
    """Static tenants (from a file) plus tenants in Redis. `authenticate(key)` is the request-path call."""

    def __init__(
        self,
        redis_client: redis.Redis | None = None,
        prefix: str = "knnssd:",
        tenants: list[Tenant] | tuple[Tenant, ...] = (),
        cache_s: float = 10.0,
    ) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.cache_s = cache_s
        self._static = {t.key_id: t for t in tenants}
        self._cache: dict[str, tuple[Tenant, float]] = {}
        self._denied: OrderedDict[str, None] = OrderedDict()  # key ids known to be removed (LRU-bounded)
        self._lock = threading.Lock()
        self.redis_errors = 0
        self.breaker = RedisBreaker()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if redis_client is not None:
            self._lookup = redis_client.register_script(_LOOKUP)
            self._add = redis_client.register_script(_ADD)

    @property
    def _tenants_key(self) -> str:
        return self.keys.tenants

    @property
    def _keys_key(self) -> str:
        return self.keys.tenant_keys

    @property
    def events_channel(self) -> str:
        return self.keys.tenant_events

    # -- request path

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning `key`, or None. Raises ServiceUnavailable if only Redis could tell and it is down."""
        if not key:
            return None
        kid = key_id(key)
        static = self._static.get(kid)
        if static is not None:
            return static if static.verify(key) else None
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(kid)
            denied = kid in self._denied
        if cached is not None and cached[1] > now:
            return cached[0] if cached[0].verify(key) else None
        if self.redis is None:
            return None
        try:
            if not self.breaker.allow():
                raise RedisSkipped("Redis recently failed; skipping it for a moment")
            raw = self._lookup(keys=[self._keys_key, self._tenants_key], args=[kid])
        except (redis.RedisError, OSError) as exc:
            self.redis_errors += 1
            if not isinstance(exc, RedisSkipped):
                self.breaker.failure()
            if denied:  # removed while Redis was up: stays removed while it is down
                return None
            if cached is not None:  # stale but known: better than locking the tenant out
                return cached[0] if cached[0].verify(key) else None
            raise ServiceUnavailable("The tenant store is unavailable; retry shortly.") from exc
        self.breaker.success()
        if not raw:
            with self._lock:
                if self._cache.pop(kid, None) is not None or denied:
                    self._deny(kid)
            return None
        tenant = Tenant.model_validate_json(raw)
        if not tenant.verify(key):
            return None
        with self._lock:
            self._cache[kid] = (tenant, now + self.cache_s)
            self._denied.pop(kid, None)
        return tenant

    def _deny(self, kid: str) -> None:  # holds self._lock
        self._denied[kid] = None
        self._denied.move_to_end(kid)
        while len(self._denied) > DENY_LIST_SIZE:
            self._denied.popitem(last=False)

    # -- removal events (pub/sub)

    def on_event(self, event: dict) -> None:
        """Apply one tenants event: a removed key leaves the cache and is denied; an added one is allowed."""
        kid = event.get("key_id")
        if not isinstance(kid, str):
            return
        with self._lock:
            if event.get("event") == "removed":
                self._cache.pop(kid, None)
                self._deny(kid)
            elif event.get("event") == "added":
                self._denied.pop(kid, None)

    def watch(self) -> TenantStore:
        """Start the thread that follows add/remove events (one per gateway replica); idempotent."""
        if self.redis is not None and self._watcher is None:
            self._stop.clear()
            self._watcher = threading.Thread(target=self._watch_loop, name="knnssd-tenant-events", daemon=True)
            self._watcher.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None

    def _watch_loop(self) -> None:
        assert self.redis is not None
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.events_channel)
                # Events sent while we were not subscribed are lost: forget what the cache vouches for.
                with self._lock:
                    self._cache.clear()
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        try:
                            self.on_event(json.loads(msg["data"]))
                        except (ValueError, TypeError):
                            log.warning("ignoring a malformed tenants event: %r", msg.get("data"))
            except (redis.RedisError, OSError) as exc:
                log.debug("tenant events subscription lost (%s); retrying", exc)
                self._stop.wait(1.0)
            finally:
                try:
                    pubsub.close()
                except (redis.RedisError, OSError):
                    pass

    def _publish(self, event: str, kid: str) -> None:
        assert self.redis is not None
        self.redis.publish(self.events_channel, json.dumps({"event": event, "key_id": kid}))

    # -- administration (Redis)

    def _need_redis(self) -> redis.Redis:
        if self.redis is None:
            raise RuntimeError("this TenantStore has no Redis; edit the tenants file instead")
        return self.redis

    def add(self, name: str, *, key: str | None = None, **limits: Any) -> tuple[Tenant, str]:
        """Add a tenant in Redis with a fresh id; returns it and its plaintext key (the only time the key exists
        in clear). `limits`: rpm, tpm, index_version, max_concurrent, max_prompt_tokens, admin."""
        self._need_redis()
        if any(t.name == name for t in self._static.values()):
            raise ValueError(f"tenant {name!r} is defined in the tenants file")
        tenant, key = Tenant.create(name, key=key, **limits)
        added = self._add(
            keys=[self._tenants_key, self._keys_key], args=[name, tenant.model_dump_json(), tenant.key_id]
        )
        if added == 0:
            raise ValueError(f"tenant {name!r} already exists")
        if added == -1:
            raise ValueError("this key is already in use by another tenant")
        self._publish("added", tenant.key_id)
        return tenant, key

    def remove(self, name: str) -> bool:
        r = self._need_redis()
        raw = r.hget(self._tenants_key, name)
        if raw is None:
            return False
        tenant = Tenant.model_validate_json(raw)
        with r.pipeline(transaction=True) as pipe:
            pipe.hdel(self._tenants_key, name)
            pipe.hdel(self._keys_key, tenant.key_id)
            pipe.publish(self.events_channel, json.dumps({"event": "removed", "key_id": tenant.key_id}))
            pipe.execute()
        self.on_event({"event": "removed", "key_id": tenant.key_id})
        return True
    def get(self, name: str) -> Tenant | None:
        for t in self._static.values():
            if t.name == name:
                return t
        if self.redis is None:
            return None
        raw = self.redis.hget(self._tenants_key, name)
        return Tenant.model_validate_json(raw) if raw else None

    def list_tenants(self) -> list[tuple[Tenant, str]]:
        """All tenants with their source ("file" or "redis"), by name."""
        out = [(t, "file") for t in self._static.values()]
        if self.redis is not None:
            out += [(Tenant.model_validate_json(v), "redis") for v in self.redis.hgetall(self._tenants_key).values()]
        return sorted(out, key=lambda x: x[0].name)
