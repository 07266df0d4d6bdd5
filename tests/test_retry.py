"""The one decision function: ack, retry with which delay, or dead-letter with which reason."""

from __future__ import annotations

import pytest

from worker.outcomes import Action, AttemptResult, ErrorKind, Reason
from worker.retry import MAX_HANDLER_ERRORS, decide, delay_tiers, next_delay
from worker.settings import RetrySettings

RETRY = RetrySettings(delays_s=(5, 30, 120), no_retry_statuses=frozenset({410, 422}))


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    """Any 2xx acks, whatever the attempt number."""
    assert decide(AttemptResult(status=status), 4, RETRY).action is Action.ACK


@pytest.mark.parametrize(
    "result",
    [AttemptResult(status=s) for s in (301, 400, 404, 429, 500, 503)]
    + [
        AttemptResult(error=e)
        for e in (
            ErrorKind.TIMEOUT,
            ErrorKind.CONNECTION_ERROR,
            ErrorKind.DNS_ERROR,
            ErrorKind.TLS_ERROR,
            ErrorKind.PROTOCOL_ERROR,
            ErrorKind.HANDLER_ERROR,
        )
    ],
)
def test_failures_retry_on_the_schedule(result: AttemptResult) -> None:
    """Non-2xx and transport errors retry with delays_s[attempt - 1]."""
    assert [decide(result, attempt, RETRY).delay_s for attempt in (1, 2, 3)] == [5, 30, 120]
    assert decide(result, 1, RETRY).action is Action.RETRY


def test_last_attempt_dead_letters_as_exhausted() -> None:
    """Attempt 1 + len(delays_s) is the last; failing it dead-letters."""
    decision = decide(AttemptResult(status=500), 4, RETRY)
    assert (decision.action, decision.reason) == (Action.DEAD_LETTER, Reason.ATTEMPTS_EXHAUSTED)
    assert decide(AttemptResult(status=500), 9, RETRY).reason is Reason.ATTEMPTS_EXHAUSTED


def test_immediate_dead_letter_reasons() -> None:
    """no_retry_statuses and blocked destinations never retry."""
    assert decide(AttemptResult(status=422), 1, RETRY).reason is Reason.NO_RETRY_STATUS
    blocked = AttemptResult(error=ErrorKind.BLOCKED_DESTINATION)
    assert decide(blocked, 1, RETRY).reason is Reason.BLOCKED_DESTINATION


def test_retry_after_rounds_up_to_a_tier_and_is_capped() -> None:
    """Retry-After lengthens (never shortens) the delay to a tier, at most the largest."""
    assert next_delay(RETRY, 1, 1) == 5
    assert next_delay(RETRY, 1, 6) == 30
    assert next_delay(RETRY, 1, 31) == 120
    assert next_delay(RETRY, 1, 10**6) == 120
    assert next_delay(RETRY, 3, 1) == 120


def test_no_delays_means_one_attempt() -> None:
    """An empty schedule dead-letters after the first failure."""
    once = RetrySettings(delays_s=())
    assert decide(AttemptResult(status=500), 1, once).reason is Reason.ATTEMPTS_EXHAUSTED
    assert delay_tiers(RetrySettings(delays_s=(5, 5, 1))) == (1, 5)


def test_handler_errors_are_bounded() -> None:
    """Hookline's own failure retries like any failure, but dead-letters as handler_error
    after MAX_HANDLER_ERRORS of them, or when it was the last attempt."""
    crashed = AttemptResult(error=ErrorKind.HANDLER_ERROR)
    assert decide(crashed, 1, RETRY, handler_errors=1).action is Action.RETRY
    assert decide(crashed, 2, RETRY, handler_errors=MAX_HANDLER_ERRORS).reason is (
        Reason.HANDLER_ERROR
    )
    assert decide(crashed, 4, RETRY, handler_errors=1).reason is Reason.HANDLER_ERROR
