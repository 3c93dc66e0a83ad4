"""Per-tenant rate limits in Redis, shared by every gateway replica: requests and tokens per window.

Algorithm: a sliding-window log, exact (no 2x burst at window edges as a fixed window allows). Each
tenant has two sorted sets scored by time in ms, one entry per admitted request and one per finished
request's token count. One Lua script (atomic in Redis, clock from Redis `TIME` so replicas agree) drops
entries older than the window, checks both limits, and admits the request by adding its entry.

- Requests: admitted while fewer than `rpm` entries are in the window; refused requests are not logged.
- Tokens: the gateway cannot know a request's tokens in advance, so a request is admitted while the
  tokens logged in the window are below `tpm`, and its prompt + completion tokens are logged when it
  finishes (`record_tokens`). One request can overshoot the limit by its own size; the next one waits.
- `retry_after` is exact: when enough entries leave the window for one more request to fit.
- Redis down or slow: with `fail_open` (default) requests are admitted and `LimitResult.degraded` is set
  so the gateway counts it (a limiter outage should not take the service down); otherwise 503. After a
  failure Redis is skipped for a second (`RedisBreaker`), so a hung Redis costs one timeout, not one per
  request. Use a client without retries (`AppConfig.redis_client()`).

Keys: `Keys.rate` of `services.keys` (`{prefix}rl:{<tenant>}:req` and `:tok`).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

import redis

from services.errors import ServiceUnavailable
from services.keys import Keys

_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local horizon = now - window
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon)

local nreq = redis.call('ZCARD', KEYS[1])
local toks = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local used = 0
for i = 1, #toks, 2 do used = used + tonumber(string.match(toks[i], ':(%d+)$')) end
local tok_reset = 0
if #toks > 0 then tok_reset = tonumber(toks[#toks]) + window - now end

-- requests: wait until the entry that makes room leaves the window
if rpm > 0 and nreq >= rpm then
  local e = redis.call('ZRANGE', KEYS[1], nreq - rpm, nreq - rpm, 'WITHSCORES')
  local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  return {0, 1, tonumber(e[2]) + window - now, nreq, used, tonumber(newest[2]) + window - now, tok_reset}
end
-- tokens: wait until enough logged tokens leave the window to be under the limit
if tpm > 0 and used >= tpm then
  local left = used
  local retry = window
  for i = 1, #toks, 2 do
    left = left - tonumber(string.match(toks[i], ':(%d+)$'))
    if left < tpm then retry = tonumber(toks[i + 1]) + window - now break end
  end
  local req_reset = 0
  if nreq > 0 then
    local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    req_reset = tonumber(newest[2]) + window - now
  end
  return {0, 2, retry, nreq, used, req_reset, tok_reset}
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window + 1000)
  nreq = nreq + 1
end
return {1, 0, 0, nreq, used, window, tok_reset}
"""

_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + 1000)
return 1
"""


class RedisBreaker:
    """After a Redis failure, skip Redis for `cooldown_s` so a hung server costs one timeout, not one per
    request. Callers treat a skipped call like a failed one (fail open, count it)."""

    def __init__(self, cooldown_s: float = 1.0) -> None:
        self.cooldown_s = cooldown_s
        self._open_until = 0.0

    def allow(self) -> bool:
        return time.monotonic() >= self._open_until

    def failure(self) -> None:
        self._open_until = time.monotonic() + self.cooldown_s

    def success(self) -> None:
        self._open_until = 0.0


class RedisSkipped(redis.ConnectionError):
    """Raised instead of calling Redis while the breaker is open."""


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1s', '6m0s', '1h2m3s'."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    return f"{m}m{sec}s" if m else f"{sec}s"


@dataclass(slots=True)
class LimitResult:
    """One check's outcome; `headers()` gives the x-ratelimit-* (and Retry-After when refused) headers."""

    allowed: bool
    exceeded: str | None = None  # "requests" or "tokens" when refused
    retry_after_s: float = 0.0
    limit_requests: int = 0  # 0: unlimited
    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    limit_tokens: int = 0
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0
    degraded: bool = False  # Redis could not be asked; admitted by fail-open

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.degraded:
            return h
        if self.limit_requests:
            h["x-ratelimit-limit-requests"] = str(self.limit_requests)
            h["x-ratelimit-remaining-requests"] = str(max(0, self.remaining_requests))
            h["x-ratelimit-reset-requests"] = format_reset(self.reset_requests_s)
        if self.limit_tokens:
            h["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            h["x-ratelimit-remaining-tokens"] = str(max(0, self.remaining_tokens))
            h["x-ratelimit-reset-tokens"] = format_reset(self.reset_tokens_s)
        if not self.allowed:
            h["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
            h["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_s * 1000)))
        return h


class RateLimiter:
    """Sliding-window request and token limits per tenant, atomic in Redis (see the module docstring)."""

    def __init__(
        self, redis_client: redis.Redis, prefix: str = "knnssd:", window_s: float = 60.0, fail_open: bool = True
    ) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.window_ms = max(1, int(window_s * 1000))
        self.fail_open = fail_open
        self.redis_errors = 0
        self.breaker = RedisBreaker()
        self._check = redis_client.register_script(_CHECK)
        self._record = redis_client.register_script(_RECORD)

    def _call(self, script, keys: list[str], args: list) -> list:
        if not self.breaker.allow():
            raise RedisSkipped("Redis recently failed; skipping it for a moment")
        try:
            res = script(keys=keys, args=args)
        except (redis.RedisError, OSError):
            self.breaker.failure()
            raise
        self.breaker.success()
        return res

    def _keys(self, tenant: str) -> list[str]:
        return list(self.keys.rate(tenant))

    def check(self, tenant: str, rpm: int, tpm: int) -> LimitResult:
        """Admit one request of `tenant` (logging it) or refuse it; 0 for a limit means unlimited."""
        if rpm <= 0 and tpm <= 0:
            return LimitResult(allowed=True)
        try:
            res = self._call(self._check, self._keys(tenant), [self.window_ms, rpm, tpm, uuid.uuid4().hex])
        except (redis.RedisError, OSError) as exc:
            return self._degraded(exc)
        allowed, code, retry_ms, nreq, used, req_reset_ms, tok_reset_ms = (int(x) for x in res)
        return LimitResult(
            allowed=bool(allowed),
            exceeded={1: "requests", 2: "tokens"}.get(code),
            retry_after_s=max(retry_ms, 1) / 1000 if not allowed else 0.0,
            limit_requests=max(rpm, 0),
            remaining_requests=rpm - nreq,
            reset_requests_s=max(req_reset_ms, 0) / 1000,
            limit_tokens=max(tpm, 0),
            remaining_tokens=tpm - used,
            reset_tokens_s=max(tok_reset_ms, 0) / 1000,
        )

    def record_tokens(self, tenant: str, tokens: int) -> bool:
        """Log a finished request's tokens; False when Redis could not be reached (counted, not raised)."""
        if tokens <= 0:
            return True
        try:
            self._call(self._record, self._keys(tenant)[1:], [self.window_ms, f"{uuid.uuid4().hex}:{int(tokens)}"])
            return True
        except (redis.RedisError, OSError):
            self.redis_errors += 1
            return False

    def _degraded(self, exc: BaseException) -> LimitResult:
        self.redis_errors += 1
        if not self.fail_open:
            raise ServiceUnavailable("The rate limiter is unavailable; retry shortly.") from exc
        return LimitResult(allowed=True, degraded=True)
