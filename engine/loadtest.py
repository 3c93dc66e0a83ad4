"""Closed-loop load on the runtime itself (no HTTP): how throughput and latency grow with concurrency.

`closed_loop(engine, prompts, configs, settings, concurrency, requests)` starts one scheduler thread
(what a replica runs) and `concurrency` client threads; each client submits a request, waits for its
last output, and submits the next, until `requests` have been sent (prompts taken round robin, so every
mode sees the same mix).
Modes compared by `knnssd bench serve`: `serial` (one request at a time, what a replica did before
batching), `batched-plain` and `batched-spec`. Every request's tokens are kept, so the bench checks they
equal the prompt's solo plain decoding.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.config import DraftConfig, RuntimeSettings, SamplingParams

SERIAL, BATCHED_PLAIN, BATCHED_SPEC = "serial", "batched-plain", "batched-spec"
MODES = (SERIAL, BATCHED_PLAIN, BATCHED_SPEC)


@dataclass
class RequestRecord:
    prompt_index: int
    submitted: float
    first_token: float | None = None
    done: float | None = None
    tokens: list[int] = field(default_factory=list)
    stats: dict | None = None

    @property
    def latency(self) -> float:
        return (self.done or 0.0) - self.submitted

    @property
    def ttft(self) -> float:
        return (self.first_token or self.done or 0.0) - self.submitted


class Claims:
    """The request numbers closed-loop clients share: each client takes the next until `n` are taken."""

    def __init__(self, n: int):
        self._taken = iter(range(n))
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            return next(self._taken, None)


def run_clients(client: Callable[[], None], concurrency: int) -> float:
    """Run `concurrency` threads of `client` to the end; returns the wall time."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def mode_settings(mode: str, base: RuntimeSettings) -> RuntimeSettings:
    if mode == SERIAL:
        return base.model_copy(update={"max_running": 1, "max_waiting": 1 << 20})
    return base.model_copy(update={"max_waiting": 1 << 20})


def closed_loop(
    engine,
    prompt_ids: Sequence[list[int]],
    configs: Sequence[DraftConfig],
    settings: RuntimeSettings,
    concurrency: int,
    requests: int,
    max_new_tokens: int = 128,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Returns every request's record and the wall time of the run."""
    sched = engine.scheduler(settings)
    stop = threading.Event()
    loop = threading.Thread(target=sched.run, args=(stop,), name="knnssd-decode", daemon=True)
    loop.start()
    records: list[RequestRecord] = []
    lock = threading.Lock()
    claims = Claims(requests)

    def client() -> None:
        while (n := claims.take()) is not None:
            i = n % len(prompt_ids)
            done = threading.Event()
            rec = RequestRecord(i, time.perf_counter())

            def emit(out, rec=rec, done=done):
                now = time.perf_counter()
                if out.token_ids and rec.first_token is None:
                    rec.first_token = now
                rec.tokens.extend(out.token_ids)
                if out.finish_reason is not None:
                    rec.done = now
                    rec.stats = out.stats.to_dict()
                    done.set()

            seq = engine.sequence(prompt_ids[i], SamplingParams(max_new_tokens=max_new_tokens), configs[i], emit=emit)
            sched.submit(seq)
            done.wait()
            with lock:
                records.append(rec)
            if on_done:
                on_done(rec)

    wall = run_clients(client, concurrency)
    stop.set()
    loop.join()
    return records, wall


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summarize(
    mode: str, concurrency: int, records: list[RequestRecord], wall: float, reference: Sequence[list[int]] | None
) -> dict:
    """One results row: aggregate and per-request throughput, latency percentiles, identical outputs (None
    without reference tokens: HTTP clients see text, compared separately)."""
    toks = sum(len(r.tokens) for r in records)
    per_req = [len(r.tokens) / r.latency for r in records if r.latency > 0]
    lat = [r.latency for r in records]
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(records),
        "tokens": toks,
        "agg_tps": round(toks / wall, 3) if wall else 0.0,
        "per_request_tps": round(statistics.median(per_req), 3) if per_req else 0.0,
        "p50_latency_s": round(_pct(lat, 0.5), 3),
        "p99_latency_s": round(_pct(lat, 0.99), 3),
        "ttft_p50_s": round(_pct([r.ttft for r in records], 0.5), 3),
        "identical": None if reference is None else all(r.tokens == reference[r.prompt_index] for r in records),
        "load_plain_steps": sum((r.stats or {}).get("load_plain_steps", 0) for r in records),
        "load_capped_steps": sum((r.stats or {}).get("load_capped_steps", 0) for r in records),
        "mean_tokens_per_step": round(statistics.fmean((r.stats or {}).get("mean_tokens_per_step", 1.0) for r in records), 3)
        if records else 0.0,
    }
