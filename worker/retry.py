"""The one place where an attempt's outcome becomes ack, retry or dead-letter."""

from __future__ import annotations

import bisect

from worker.outcomes import DELIVERED, Action, AttemptResult, Decision, ErrorKind, Reason
from worker.settings import RetrySettings

# A message on which the worker itself failed this many times is dead-lettered with reason
# ``handler_error`` even if attempts remain: the failure is Hookline's, and repeating it on
# the full schedule would only delay the operator's look at it.
MAX_HANDLER_ERRORS = 3


def decide(
    result: AttemptResult, attempt: int, retry: RetrySettings, handler_errors: int = 0
) -> Decision:
    """What to do with a message whose ``attempt``-th attempt (1-based) ended in ``result``;
    ``handler_errors`` counts the worker's own failures on it, this one included."""
    if result.delivered:
        return DELIVERED
    if result.error is ErrorKind.BLOCKED_DESTINATION:
        return Decision(Action.DEAD_LETTER, reason=Reason.BLOCKED_DESTINATION)
    if result.status is not None and result.status in retry.no_retry_statuses:
        return Decision(Action.DEAD_LETTER, reason=Reason.NO_RETRY_STATUS)
    if result.error is ErrorKind.HANDLER_ERROR and (
        handler_errors >= MAX_HANDLER_ERRORS or attempt >= retry.max_attempts
    ):
        return Decision(Action.DEAD_LETTER, reason=Reason.HANDLER_ERROR)
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
