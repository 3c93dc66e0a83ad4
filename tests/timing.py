"""Timing in tests without wall-clock guesses: scenarios that need several requests to land inside a
rate-limit window (or a cache TTL) run with a short window first, and only when the machine was
demonstrably too slow for it (the requests took longer than the window itself) again with a longer one.
A failure inside a window that the requests did fit is a real failure and is raised at once; a fast
machine can never fail these.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

WINDOWS = (1.0, 4.0, 16.0)


class TooSlow(Exception):
    """The requests a scenario needed inside its window took longer than the window: inconclusive."""


class Window:
    """A window of `seconds` opened when the scenario's first counted request is about to be sent."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0 = time.monotonic()

    def check(self) -> None:
        """Call where an assertion relies on everything since the window opened having taken less than
        the window: raises TooSlow when it did not (then nothing can be concluded from this run)."""
        if time.monotonic() - self.t0 >= self.seconds:
            raise TooSlow(f"{time.monotonic() - self.t0:.2f} s >= window {self.seconds} s")

    def expect(self, ok: bool, detail: object = "") -> None:
        """assert `ok`, unless it failed on a machine too slow for the window (then TooSlow)."""
        if not ok:
            self.check()
        assert ok, detail


def with_growing_window(scenario: Callable[[float], T], windows: tuple[float, ...] = WINDOWS) -> T:
    """Run scenario(window_s) with each window in turn until it completes without TooSlow."""
    slow = []
    for w in windows:
        try:
            return scenario(w)
        except TooSlow as exc:
            slow.append(str(exc))
    raise AssertionError(f"the machine was too slow for every window tried: {slow}")
