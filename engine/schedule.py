"""The runtime: many requests advanced together by one loop (continuous batching).

Each `step()` is one iteration over every running `Sequence`:
1. admit waiting requests into free slots (a slot is one sequence's KV cache);
2. draft: prompt lookup per request (free), then model drafts batched per `DraftPlan`, one pass per
   draft position; the load-aware cap (`engine.costs.speculation_cap`) shortens or switches off drafts
   when the measured costs say the extra rows no longer pay at this batch size;
3. one full pass over every decoding request's [cur, drafts...] rows plus prefill chunks of requests
   still reading their prompt (whole chunks, up to a row budget, so a long prompt never blocks others);
4. accept, commit, emit; finished or cancelled requests free their slot at once.

Lossless under batching: every row's logits are independent of the other rows in the pass (see
`engine.lean`), and seeded sampling draws from a per-request generator with drafts that never depend on
load, so a request's output is what it would be alone. One thread calls `step()` (or `run()`);
`submit()` and `Sequence.cancel()` may be called from any thread.
"""

from __future__ import annotations

import threading
from collections import deque

import torch
from engine.config import RuntimeSettings
from engine.costs import PassCosts, SeqOutlook, speculation_cap
from engine.decode import Sequence
from engine.draft import NO_DRAFT, Draft, DraftJob, draft_batch, job_draft
from engine.gpu import device_clock, to_device, to_host
from engine.lean import FULL, LeanModel, Segment
from engine.plain import LOAD, plain_reason


class QueueFull(RuntimeError):
    """The runtime's waiting queue is full; retry later."""

    def __init__(self, waiting: int):
        self.waiting = waiting
        super().__init__(f"{waiting} requests are already waiting for this replica; retry shortly")

    def __reduce__(self):
        return (QueueFull, (self.waiting,))


class Scheduler:
    def __init__(self, model: LeanModel, settings: RuntimeSettings | None = None, costs: PassCosts | None = None):
        self.model = model
        self.settings = settings or RuntimeSettings()
        self.costs = costs or PassCosts()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self.iterations = 0

    # ---- intake (any thread) -------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            if len(self.waiting) >= self.settings.max_waiting and len(self.running) >= self.settings.max_running:
                raise QueueFull(len(self.waiting))
            self.waiting.append(seq)
            self._wake.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.running), len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def run(self, stop: threading.Event, idle_wait_s: float = 0.05) -> None:
        """Step until `stop` is set, sleeping while there is nothing to do (a replica's decode thread)."""
        while not stop.is_set():
            if not self.has_work():
                with self._wake:
                    self._wake.wait(idle_wait_s)
                continue
            self.step()

    # ---- one iteration (the stepping thread) ---------------------------------------------------------

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and len(self.running) < self.settings.max_running:
                self.running.append(self.waiting.popleft())
            gone = [s for s in self.waiting if s.cancelled]
            for s in gone:
                self.waiting.remove(s)
        for s in gone:
            s.finish("cancelled")

    def step(self) -> int:
        """One iteration; returns the rows of its full pass (0 when there was nothing to do)."""
        for s in [s for s in self.running if s.cancelled]:
            s.finish("cancelled")
        self.running = [s for s in self.running if not s.finished]
        self._admit()
        if not self.running:
            return 0
        self.iterations += 1
        decoding = [s for s in self.running if not s.prefilling]
        prefilling = [s for s in self.running if s.prefilling]
        for s in self.running:
            s.stats.max_batch = max(s.stats.max_batch, len(self.running))

        prefill_segs: list[tuple[Sequence, Segment]] = []
        rows = 0
        # least-prefilled first: a short prompt is not starved by a long one that arrived before it
        for s in sorted(prefilling, key=lambda s: s.prefilled):
            seg = s.prefill_segment(self.settings.prefill_chunk)
            if prefill_segs and rows + seg.tokens.shape[0] > self.settings.prefill_rows:
                break
            prefill_segs.append((s, seg))
            rows += seg.tokens.shape[0]

        drafts, draft_s = self._draft(decoding, rows) if decoding else ({}, {})
        # every decoding request's [cur, drafts...] rows reach the device in one transfer
        rows_in = to_device([s.verify_tokens(drafts[s]) for s in decoding], self.model.device)
        segs = [s.verify_segment(drafts[s], t) for s, t in zip(decoding, rows_in)] + [seg for _, seg in prefill_segs]
        dev = self.model.device
        t0 = device_clock(dev)
        with torch.inference_mode():
            outs = self.model.forward_batch(segs)
        dt = device_clock(dev) - t0
        outs = to_host(outs)  # every request's greedy tokens in one transfer, not one sync per request
        n_rows = sum(seg.tokens.shape[0] for seg in segs)
        self.costs.observe(FULL.key, n_rows, dt)
        # a plain step would have cost one full pass over one row per decoding request: a model-drafted
        # step is judged against that (online correction)
        base = self.costs.estimate(FULL.key, len(decoding) + rows) or dt
        with torch.inference_mode():
            for s, logits in zip(decoding, outs):
                d = drafts[s]
                ds = draft_s.get(s, 0.0)
                step_cost = (ds + dt) / base if d.source == "model" else 0.0
                s.after_verify(d, logits, ds, dt, step_cost)
            for (s, seg), logits in zip(prefill_segs, outs[len(decoding):]):
                s.after_prefill(seg, logits, dt)
        self.running = [s for s in self.running if not s.finished]
        return n_rows

    def _draft(self, decoding: list[Sequence], fixed_rows: int) -> tuple[dict[Sequence, Draft], dict[Sequence, float]]:
        """Each decoding request's draft for this step, and the seconds of the draft passes it shared."""
        limits = {s: s.draft_limit() for s in decoding}
        cap = None
        flexible = [s for s in decoding if not s.deterministic_drafts and limits[s] > 0]
        if flexible:
            self._calibrate(flexible)  # once per plan: online correction and the cap read these costs
        if self.settings.load_aware and len(decoding) > 1 and flexible:
            fixed = fixed_rows + sum(1 + limits[s] for s in decoding if s not in flexible)
            outlook = [SeqOutlook(s.alpha, limits[s], s.drafter.plan.key if s.drafter.plan else None) for s in flexible]
            cap = speculation_cap(self.costs, FULL.key, outlook, fixed)
        drafts: dict[Sequence, Draft] = {}
        jobs: dict[tuple, list[tuple[Sequence, DraftJob]]] = {}
        for s in decoding:
            limit = limits[s]
            if cap is not None and s in flexible and cap < limit:
                if plain_reason(s.config, cap=cap) == LOAD:
                    limit = 0
                    s.stats.load_plain_steps += 1
                else:
                    limit = cap
                    s.stats.load_capped_steps += 1
            if limit <= 0:
                drafts[s] = NO_DRAFT
                continue
            d = s.lookup_draft(limit)
            if d is not None:
                drafts[s] = d
            elif s.drafter.wants_model():
                plan = s.drafter.plan
                job = DraftJob(s.cache, s.pos, s.cur, limit, s.drafter.threshold, s.params, s.gen)
                jobs.setdefault(plan.key, []).append((s, job))
            else:
                drafts[s] = NO_DRAFT
        seconds: dict[Sequence, float] = {}
        for key, group in jobs.items():
            plan = group[0][0].drafter.plan
            t0 = device_clock(self.model.device)
            with torch.inference_mode():
                passes = draft_batch(self.model, plan, [j for _, j in group])
            dt = device_clock(self.model.device) - t0
            if passes:
                self.costs.observe(key, len(group), dt / passes)
            for s, job in group:
                drafts[s] = job_draft(job)
                seconds[s] = dt
        return drafts, seconds

    def _calibrate(self, seqs: list[Sequence]) -> None:
        """Seed the cost table for the full pass and each draft plan in use (a few dummy passes)."""
        if not self.settings.calibrate:
            return
        todo = [(FULL.key, FULL)] + [(s.drafter.plan.key, s.drafter.plan) for s in seqs if s.drafter.plan]
        for key, plan in todo:
            if key in self.costs.calibrated:
                continue
            self.costs.calibrated.add(key)
            calibrate(self.model, self.costs, plan, (1, 2, 4, 8, 16, 32) if plan is FULL else (1, 2, 4, 8))


def calibrate(model: LeanModel, costs: PassCosts, plan, rows_list, context: int = 64) -> None:
    """Time one pass of `plan` at each row count: rows at position `context` (they all share one scratch
    cache, which only the timing needs)."""
    cache = model.new_cache(context + 1)
    dev = model.device
    with torch.inference_mode():
        model.forward_batch([Segment(cache, 0, torch.zeros(context, dtype=torch.long, device=dev), "none", exact=False)])
        for rows in rows_list:
            segs = [Segment(cache, context, torch.zeros(1, dtype=torch.long, device=dev)) for _ in range(rows)]
            for rep in range(2):
                t0 = device_clock(dev)
                model.forward_batch(segs, plan)
                if rep:  # the first run warms caches and kernels
                    costs.observe(plan.key, rows, device_clock(dev) - t0)
