"""The per-endpoint circuit breaker: a pure state machine; the consumer acts on its changes.

Closed: every message is attempted. After ``failure_threshold`` attempts in a row that
found the endpoint unavailable (5xx, 408, 429, timeout, network or TLS error) it opens:
the consumer cancels its subscription, so events wait in the endpoint's queue and spend
none of their attempts. After the cool-down it is half-open: one message at a time is let
through as a probe. A probe the endpoint answers closes it; a failed one opens it again
with twice the cool-down, up to ``max_cooldown_s``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.settings import CircuitBreakerSettings


class CircuitState(enum.IntEnum):
    # The values are the ``webhook_endpoint_circuit_state`` gauge's.
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Transition:
    old: CircuitState
    new: CircuitState
    consecutive_failures: int
    cooldown_s: float
    # Seconds since the circuit last left CLOSED (set when it closes again).
    outage_s: float | None = None


class CircuitBreaker:
    def __init__(
        self,
        settings: CircuitBreakerSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self.state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self.cooldown_s = settings.cooldown_s
        self._opened_at: float | None = None

    def record(self, available: bool) -> Transition | None:
        """Count one attempt: did the endpoint answer (2xx, or a 4xx refusal)? Returns the
        change of state it causes, if any."""
        if self.state is CircuitState.OPEN:
            # Results of attempts that were already in flight when it opened.
            return None
        if available:
            self.consecutive_failures = 0
            if self.state is CircuitState.HALF_OPEN:
                outage_s = self._clock() - (self._opened_at or self._clock())
                self.cooldown_s = self._settings.cooldown_s
                self._opened_at = None
                return self._move(CircuitState.CLOSED, outage_s=outage_s)
            return None
        self.consecutive_failures += 1
        if self.state is CircuitState.HALF_OPEN:
            self.cooldown_s = min(self.cooldown_s * 2, self._settings.max_cooldown_s)
            return self._move(CircuitState.OPEN)
        if self.consecutive_failures >= self._settings.failure_threshold:
            self._opened_at = self._clock()
            return self._move(CircuitState.OPEN)
        return None

    def half_open(self) -> Transition:
        """The cool-down is over: let a probe through."""
        return self._move(CircuitState.HALF_OPEN)

    def _move(self, new: CircuitState, outage_s: float | None = None) -> Transition:
        old, self.state = self.state, new
        return Transition(old, new, self.consecutive_failures, self.cooldown_s, outage_s)
