"""Measured pass costs and the load-aware speculation cap. Pure Python over timings.

`PassCosts` keeps the seconds one pass takes by (plan, rows): seeded by a short calibration when a plan
is first used, then an exponential average of every pass the scheduler runs, so it follows the device
and the machine's load. Speculation adds rows to every step; with many requests in the batch those
rows can cost more than they save. `speculation_cap` picks the draft length cap K (0 = plain steps)
that maximises expected committed tokens per second for the current batch (vLLM switches speculation
off above a fixed batch size; here the threshold comes from measured costs, per device).
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CAPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class PassCosts:
    """Per (plan key, bucket of rows): an exponential average of (rows, seconds); estimates interpolate
    linearly between the buckets' points (pass cost is close to linear in rows once weights stream)."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self._pts: dict[tuple[Hashable, int], tuple[float, float]] = {}
        self.calibrated: set[Hashable] = set()  # keys seeded by a calibration run

    @staticmethod
    def bucket(rows: int) -> int:
        i = bisect.bisect_left(BUCKETS, rows)
        return BUCKETS[min(i, len(BUCKETS) - 1)]

    def known(self, key: Hashable) -> bool:
        return any(k == key for k, _ in self._pts)

    def observe(self, key: Hashable, rows: int, seconds: float) -> None:
        b = self.bucket(rows)
        old = self._pts.get((key, b))
        if old is None:
            self._pts[(key, b)] = (float(rows), seconds)
        else:
            a = self.alpha
            self._pts[(key, b)] = ((1 - a) * old[0] + a * rows, (1 - a) * old[1] + a * seconds)

    def estimate(self, key: Hashable, rows: int) -> float | None:
        """Seconds for `rows` rows: linear between measured points, flat below the first, proportional
        beyond the last."""
        pts = sorted(p for (k, _), p in self._pts.items() if k == key)
        if not pts:
            return None
        rows = max(rows, 1)
        if rows <= pts[0][0]:
            return pts[0][1]
        for (r0, t0), (r1, t1) in zip(pts, pts[1:]):
            if rows <= r1:
                return t0 + (t1 - t0) * (rows - r0) / max(r1 - r0, 1e-9)
        r, t = pts[-1]
        return t * rows / r


def expected_tokens(alpha: float, k: int) -> float:
    """Committed tokens of one step drafting k tokens at per-token acceptance alpha (Leviathan et al.):
    (1 - alpha^(k+1)) / (1 - alpha), k + 1 at alpha = 1. The one model of it: the load-aware cap here
    and the index search's screening (`index.screen.proxy_speedup`) both use it."""
    if k <= 0:
        return 1.0
    alpha = min(max(alpha, 0.0), 1.0)
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class SeqOutlook:
    """What the cap decision needs to know about one decoding request."""

    alpha: float  # running acceptance of its drafts
    max_k: int  # most tokens it would draft this step (0: none)
    plan: Hashable | None  # model-draft plan key; None for lookup drafts (no draft pass)


def speculation_cap(costs: PassCosts, full: Hashable, seqs: Sequence[SeqOutlook], fixed_rows: int = 0) -> int | None:
    """The draft-length cap with the best expected tokens per second for this batch, 0 for none, or None
    when costs are not yet known. `fixed_rows` are rows in the pass regardless (prefill chunks, requests
    whose drafting must not depend on load)."""
    if not seqs:
        return None
    base = costs.estimate(full, fixed_rows + len(seqs))
    if base is None:
        return None
    best_k, best_rate = 0, len(seqs) / base
    top = max(s.max_k for s in seqs)
    for cap in CAPS:
        if cap > top:
            break
        rows = fixed_rows + sum(1 + min(cap, s.max_k) for s in seqs)
        t = costs.estimate(full, rows)
        groups: dict[Hashable, tuple[int, int]] = {}
        for s in seqs:
            if s.plan is not None and s.max_k:
                n, k = groups.get(s.plan, (0, 0))
                groups[s.plan] = (n + 1, max(k, min(cap, s.max_k)))
        for plan, (n, k) in groups.items():
            d = costs.estimate(plan, n)
            if d is None:
                return None
            t += k * d
        rate = sum(expected_tokens(s.alpha, min(cap, s.max_k)) for s in seqs) / t
        if rate > best_rate:
            best_k, best_rate = cap, rate
    return best_k
