"""Per-tenant usage counters in Redis: requests, prompt tokens, completion tokens, in total and per UTC day.

Written once per finished request (one MULTI transaction of HINCRBYs), read by `GET /v1/usage`, which
only ever asks for the calling tenant's own counters. Keys (`services.keys`): `{prefix}usage:{tenant}` (total)
and `{prefix}usage:{tenant}:{YYYY-MM-DD}` (daily, expiring after `day_ttl_s`). A failed write is reported
(False) and counted by the caller, never raised: usage accounting must not fail a finished request.
"""

from __future__ import annotations

import datetime as dt

import redis
from pydantic import BaseModel, Field

from services.errors import ServiceUnavailable
from services.keys import Keys
from services.limits import RedisBreaker, RedisSkipped

FIELDS = ("requests", "prompt_tokens", "completion_tokens")


class UsageCounts(BaseModel):
    requests: int = Field(0, description="Requests that produced output.")
    prompt_tokens: int = Field(0, description="Prompt tokens processed.")
    completion_tokens: int = Field(0, description="Tokens generated.")
    total_tokens: int = Field(0, description="prompt_tokens + completion_tokens.")

    @classmethod
    def from_hash(cls, h: dict) -> UsageCounts:
        vals = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in h.items()}
        c = {f: vals.get(f, 0) for f in FIELDS}
        return cls(**c, total_tokens=c["prompt_tokens"] + c["completion_tokens"])


class UsageReport(BaseModel):
    object: str = Field("usage", description="Always 'usage'.")
    tenant: str = Field(description="The calling tenant.")
    total: UsageCounts = Field(description="Since the tenant's first request.")
    daily: dict[str, UsageCounts] = Field(description="Per UTC day, most recent first (days with no use left out).")


def _today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


class UsageStore:
    def __init__(self, redis_client: redis.Redis, prefix: str = "knnssd:", day_ttl_s: int = 40 * 86400) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.day_ttl_s = day_ttl_s
        self.redis_errors = 0
        self.breaker = RedisBreaker()

    def _key(self, tenant: str, day: dt.date | None = None) -> str:
        return self.keys.usage(tenant, None if day is None else day.isoformat())

    def record(self, tenant: str, prompt_tokens: int, completion_tokens: int) -> bool:
        day_key = self._key(tenant, _today())
        try:
            if not self.breaker.allow():
                raise RedisSkipped("Redis recently failed")
            with self.redis.pipeline(transaction=True) as pipe:
                for key in (self._key(tenant), day_key):
                    pipe.hincrby(key, "requests", 1)
                    pipe.hincrby(key, "prompt_tokens", int(prompt_tokens))
                    pipe.hincrby(key, "completion_tokens", int(completion_tokens))
                pipe.expire(day_key, self.day_ttl_s)
                pipe.execute()
            self.breaker.success()
            return True
        except (redis.RedisError, OSError) as exc:
            self.redis_errors += 1
            if not isinstance(exc, RedisSkipped):
                self.breaker.failure()
            return False

    def get(self, tenant: str, days: int = 7) -> UsageReport:
        today = _today()
        day_list = [today - dt.timedelta(days=i) for i in range(days)]
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._key(tenant))
                for d in day_list:
                    pipe.hgetall(self._key(tenant, d))
                total, *per_day = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.redis_errors += 1
            raise ServiceUnavailable("Usage data is unavailable right now; retry shortly.") from exc
        daily = {d.isoformat(): UsageCounts.from_hash(h) for d, h in zip(day_list, per_day) if h}
        return UsageReport(tenant=tenant, total=UsageCounts.from_hash(total), daily=daily)
