"""Attempt outcomes over the last minute, per endpoint, for the status page."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60


@dataclass(frozen=True, slots=True)
class RecentRates:
    delivered_per_s: float
    failed_per_s: float

    @property
    def error_ratio(self) -> float | None:
        total = self.delivered_per_s + self.failed_per_s
        return self.failed_per_s / total if total else None


class RecentOutcomes:
    """Counts in one-second buckets of a ring; old buckets are reset as time passes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._seconds = [-1] * WINDOW_S
        self._delivered = [0] * WINDOW_S
        self._failed = [0] * WINDOW_S

    def record(self, delivered: bool) -> None:
        second = int(self._clock())
        slot = second % WINDOW_S
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._delivered[slot] = self._failed[slot] = 0
        if delivered:
            self._delivered[slot] += 1
        else:
            self._failed[slot] += 1

    def rates(self) -> RecentRates:
        now = self._clock()
        oldest = int(now) - WINDOW_S + 1
        delivered = failed = 0
        for slot, second in enumerate(self._seconds):
            if second >= oldest:
                delivered += self._delivered[slot]
                failed += self._failed[slot]
        # A worker younger than the window divides by its age, so a fresh start reads true.
        span_s = max(1.0, min(float(WINDOW_S), now - self._started))
        return RecentRates(delivered / span_s, failed / span_s)
