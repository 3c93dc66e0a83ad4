"""Redis cache of routing decisions, and the guarded Redis link the router uses for every Redis call.

Keys are `{prefix}knnssd:route:{index_version}:{tenant}:{sha256(normalised prompt)}` with a TTL, so a new
index version makes every old entry unreachable at once (no mass delete; old keys expire by themselves).
Redis is an optimisation, never a dependency: a refused connection, a timeout or a protocol error is
counted, Redis is skipped for a short growing backoff, and the caller routes from its local index.
A stored value that does not parse, or disagrees with its key, is ignored (and the caller overwrites it).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import unicodedata
from collections.abc import Callable
from typing import TypeVar

import redis
from pydantic import ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from router.decision import RouteDecision
from router.stats import RouteStats

log = logging.getLogger(__name__)

T = TypeVar("T")
ROUTE_KEY_PREFIX = "knnssd:route:"


def normalise_prompt(text: str) -> str:
    """Canonical form hashed into cache keys: NFC, whitespace runs collapsed, trimmed, lower-cased.

    The default embedder (all-MiniLM-L6-v2, uncased WordPiece) sees these variants as the same input,
    so they share one decision.
    """
    return " ".join(unicodedata.normalize("NFC", text).split()).lower()


def prompt_hash(text: str) -> str:
    return hashlib.sha256(normalise_prompt(text).encode("utf-8")).hexdigest()


class RedisLink:
    """One Redis client with short timeouts, no client-side retries, and a backoff after errors.

    `call(fn, default)` runs `fn(client)`; on any Redis or socket error it records the error, marks Redis
    down for `backoff` seconds (doubling up to `backoff_max_s`, reset by the next success) and returns
    `default`. While down, calls return `default` at once without touching the network, so a dead Redis
    is probed at most once per backoff period. Reconnecting is the pool's job: the next call after the
    backoff opens a fresh connection.
    """

    def __init__(
        self,
        url: str,
        stats: RouteStats | None = None,
        *,
        socket_timeout_s: float = 0.05,
        connect_timeout_s: float = 0.05,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.stats = stats if stats is not None else RouteStats()
        self.socket_timeout_s = socket_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self._lock = threading.Lock()
        self._backoff = 0.0
        self._down_until = 0.0
        self.client = self.make_client()

    def make_client(self) -> redis.Redis:
        """A new client with this link's timeouts; redis-py's default retries (10, with sleeps) are off."""
        return redis.Redis.from_url(
            self.url,
            socket_timeout=self.socket_timeout_s,
            socket_connect_timeout=self.connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )

    @property
    def up(self) -> bool:
        """False while in backoff after an error."""
        return self._clock() >= self._down_until

    def call(self, fn: Callable[[redis.Redis], T], default: T) -> T:
        if not self.up:
            self.stats.observe_redis_skipped()
            return default
        try:
            out = fn(self.client)
        except redis.ResponseError as e:
            # The server answered, it just refused this command (e.g. WRONGTYPE): no backoff.
            self.stats.observe_redis_error()
            log.debug("redis refused a command: %s", e)
            return default
        except (redis.RedisError, OSError) as e:
            self.stats.observe_redis_error()
            with self._lock:
                self._backoff = min(max(self._backoff * 2, self.backoff_initial_s), self.backoff_max_s)
                self._down_until = self._clock() + self._backoff
            log.warning("redis unavailable (%s); skipping it for %.2fs", type(e).__name__, self._backoff)
            return default
        if self._backoff:
            with self._lock:
                self._backoff = 0.0
        return out

    def close(self) -> None:
        try:
            self.client.close()
        except (redis.RedisError, OSError):
            pass


class RouteCache:
    """Decision cache over a `RedisLink`. `get` counts hits and misses (only when Redis answered)."""

    def __init__(self, link: RedisLink, *, ttl_s: int = 3600, key_prefix: str = "", stats: RouteStats | None = None):
        self.link = link
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self.stats = stats if stats is not None else link.stats

    def key(self, index_version: str, tenant: str, text: str) -> str:
        return f"{self.key_prefix}{ROUTE_KEY_PREFIX}{index_version}:{tenant}:{prompt_hash(text)}"

    def get(self, index_version: str, tenant: str, text: str) -> RouteDecision | None:
        """The cached decision for this prompt under this index version, or None (miss, malformed, no Redis)."""
        key = self.key(index_version, tenant, text)
        missing = object()
        raw = self.link.call(lambda r: r.get(key), missing)
        if raw is missing:
            return None  # Redis unavailable: neither a hit nor a miss
        if raw is None:
            self.stats.observe_cache(hit=False)
            return None
        try:
            decision = RouteDecision.model_validate_json(raw)
            if decision.index_version != index_version:
                raise ValueError(f"cached under {index_version!r} but made with {decision.index_version!r}")
        except (ValidationError, ValueError, UnicodeDecodeError) as e:
            self.stats.observe_malformed()
            self.stats.observe_cache(hit=False)
            log.warning("ignoring malformed cached decision at %s: %s", key, str(e).splitlines()[0])
            return None
        self.stats.observe_cache(hit=True)
        return decision.model_copy(update={"cached": True})

    def put(self, decision: RouteDecision, tenant: str, text: str) -> bool:
        """Store (or overwrite) a decision; False when Redis was unavailable."""
        key = self.key(decision.index_version, tenant, text)
        value = decision.model_dump_json(exclude={"cached"})
        return bool(self.link.call(lambda r: r.set(key, value, ex=self.ttl_s), False))
