"""A token bucket: the most attempts per second one worker makes to one endpoint."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# A bucket holds a tenth of a second's worth of tokens (at least one), so a limit holds
# over any window of a second or more while asyncio's timer granularity costs no rate.
BURST_WINDOW_S = 0.1


class TokenBucket:
    def __init__(self, rate_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s * BURST_WINDOW_S)
        self._clock = clock
        self._tokens = self.capacity
        self._updated = clock()
        # Waiters take tokens in arrival order.
        self._lock = asyncio.Lock()

    async def acquire(self) -> bool:
        """Take a token, waiting for one if need be; True if it had to wait."""
        waited = self._lock.locked()
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(
                    self.capacity, self._tokens + (now - self._updated) * self.rate_per_s
                )
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return waited
                waited = True
                await asyncio.sleep((1 - self._tokens) / self.rate_per_s)
