"""Route stats: a dataclass that collects numbers through `observe_*` methods; exporters only read it.

Counters are plain ints behind one lock (routers are called from several threads in a Serve replica);
latency samples are bounded deques of seconds, so a long-running router keeps a recent window.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

STAGES = ("embed", "search", "cache", "total")


def percentile(samples: list[float] | deque[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of `samples`; 0.0 for no samples."""
    if not samples:
        return 0.0
    xs = sorted(samples)
    rank = min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))
    return xs[rank]


def _window(maxlen: int) -> dict[str, deque[float]]:
    return {s: deque(maxlen=maxlen) for s in STAGES}


@dataclass
class RouteStats:
    """What the router saw. All latencies are in seconds."""

    max_samples: int = 10_000
    decisions: Counter = field(default_factory=Counter)  # domain -> count ("fallback" counted here too)
    requests: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_malformed: int = 0  # cached values that failed to parse or disagreed with their key
    fallbacks: int = 0
    redis_errors: int = 0  # Redis calls that failed (refused, timeout, protocol error)
    redis_skipped: int = 0  # Redis calls not attempted because Redis is in backoff after an error
    reloads: int = 0
    reload_errors: int = 0
    latency: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.latency:
            self.latency = _window(self.max_samples)

    # -- collectors -------------------------------------------------------------------------------

    def observe_decision(self, domain: str, fallback: bool, cached: bool) -> None:
        with self._lock:
            self.requests += 1
            self.decisions[domain] += 1
            if fallback:
                self.fallbacks += 1

    def observe_cache(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.cache_hits += 1
            else:
                self.cache_misses += 1

    def observe_malformed(self) -> None:
        with self._lock:
            self.cache_malformed += 1

    def observe_redis_error(self) -> None:
        with self._lock:
            self.redis_errors += 1

    def observe_redis_skipped(self) -> None:
        with self._lock:
            self.redis_skipped += 1

    def observe_reload(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.reloads += 1
            else:
                self.reload_errors += 1

    def observe_latency(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        with self._lock:
            self.latency[stage].append(seconds)

    # -- readers ----------------------------------------------------------------------------------

    def p50(self, stage: str) -> float:
        with self._lock:
            return percentile(list(self.latency[stage]), 50)

    def p99(self, stage: str) -> float:
        with self._lock:
            return percentile(list(self.latency[stage]), 99)

    @property
    def cache_hit_rate(self) -> float:
        n = self.cache_hits + self.cache_misses
        return self.cache_hits / n if n else 0.0

    def reset_latency(self) -> None:
        with self._lock:
            self.latency = _window(self.max_samples)

    def snapshot(self) -> dict[str, Any]:
        """A plain-dict copy for exporters (JSON, logs, Prometheus collectors)."""
        with self._lock:
            lat = {s: list(v) for s, v in self.latency.items()}
            out: dict[str, Any] = {
                "requests": self.requests,
                "decisions": dict(self.decisions),
                "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses,
                "cache_malformed": self.cache_malformed,
                "fallbacks": self.fallbacks,
                "redis_errors": self.redis_errors,
                "redis_skipped": self.redis_skipped,
                "reloads": self.reloads,
                "reload_errors": self.reload_errors,
            }
        out["latency_ms"] = {
            s: {"n": len(xs), "p50": round(percentile(xs, 50) * 1e3, 4), "p99": round(percentile(xs, 99) * 1e3, 4)}
            for s, xs in lat.items()
        }
        return out
