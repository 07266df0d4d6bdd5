"""The one place where an attempt's outcome becomes ack, retry or dead-letter."""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

from worker.delivery import AttemptResult
from worker.settings import RetrySettings


class Action(enum.Enum):
    ACK = "delivered"
    RETRY = "retried"
    DEAD_LETTER = "dead_lettered"


class Reason(enum.StrEnum):
    """``hookline-reason`` values (public contract)."""

    INVALID_ENVELOPE = "invalid_envelope"
    BLOCKED_DESTINATION = "blocked_destination"
    NO_RETRY_STATUS = "no_retry_status"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    ENDPOINT_REMOVED = "endpoint_removed"  # set by ``dlq retire``, never by a delivery


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float | None = None
    reason: Reason | None = None


DELIVERED = Decision(Action.ACK)


def decide(result: AttemptResult, attempt: int, retry: RetrySettings) -> Decision:
    """What to do with a message whose ``attempt``-th attempt (1-based) ended in ``result``."""
    if result.delivered:
        return DELIVERED
    if result.error == "invalid_envelope":
        return Decision(Action.DEAD_LETTER, reason=Reason.INVALID_ENVELOPE)
    if result.error == "blocked_destination":
        return Decision(Action.DEAD_LETTER, reason=Reason.BLOCKED_DESTINATION)
    if result.status is not None and result.status in retry.no_retry_statuses:
        return Decision(Action.DEAD_LETTER, reason=Reason.NO_RETRY_STATUS)
    if attempt >= retry.max_attempts:
        return Decision(Action.DEAD_LETTER, reason=Reason.ATTEMPTS_EXHAUSTED)
    return Decision(Action.RETRY, delay_s=next_delay(retry, attempt, result.retry_after_s))


def next_delay(retry: RetrySettings, attempt: int, retry_after_s: float | None) -> float:
    """The delay tier for the next attempt; ``Retry-After`` may lengthen it up to the largest.

    Delays are queues with a fixed TTL, so a requested delay is rounded up to a tier.
    """
    scheduled = retry.delays_s[attempt - 1]
    if retry_after_s is None or retry_after_s <= scheduled:
        return scheduled
    tiers = delay_tiers(retry)
    index = bisect.bisect_left(tiers, retry_after_s)
    return tiers[min(index, len(tiers) - 1)]


def delay_tiers(retry: RetrySettings) -> tuple[float, ...]:
    """Every distinct configured delay, ascending: one delay queue each per endpoint."""
    return tuple(sorted(set(retry.delays_s)))
