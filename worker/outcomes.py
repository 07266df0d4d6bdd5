"""What a delivery can come to: the vocabulary shared by the HTTP client, the retry rules,
the consumer and the operator tools. Values are part of the public contract (headers,
log fields and metric labels)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Statuses that say the endpoint is overloaded rather than refusing this event.
UNAVAILABLE_STATUSES = frozenset({408, 429})


class ErrorKind(enum.StrEnum):
    """Why an attempt got no HTTP status: the ``hookline-last-status`` value and the
    ``status_class`` metric label in that case."""

    TIMEOUT = "timeout"
    TLS_ERROR = "tls_error"
    DNS_ERROR = "dns_error"
    CONNECTION_ERROR = "connection_error"
    PROTOCOL_ERROR = "protocol_error"
    BLOCKED_DESTINATION = "blocked_destination"
    # Hookline itself failed while handling the message (a bug): counted as a failed
    # attempt so that it ends like any other failure instead of looping.
    HANDLER_ERROR = "handler_error"


class Reason(enum.StrEnum):
    """``hookline-reason`` values (public contract)."""

    INVALID_ENVELOPE = "invalid_envelope"
    BLOCKED_DESTINATION = "blocked_destination"
    NO_RETRY_STATUS = "no_retry_status"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    HANDLER_ERROR = "handler_error"
    ENDPOINT_REMOVED = "endpoint_removed"  # set by ``dlq retire``, never by a delivery
    # Set by the broker, not by Hookline: a quorum queue's delivery limit was exceeded and
    # the queue dead-lettered the message (the tools read it from ``x-death``).
    DELIVERY_LIMIT = "delivery_limit"


class Action(enum.Enum):
    """What becomes of a message once it is decided; the value is the ``outcome`` log field
    (and, for the actions an attempt ends in, the ``outcome`` metric label)."""

    ACK = "delivered"
    RETRY = "retried"
    DEAD_LETTER = "dead_lettered"
    # Never attempted: the event does not match the endpoint's filter (worker.filters). It
    # is acknowledged without a request, and counted in webhook_filtered_total only.
    FILTER = "filtered"


# What an attempt can end in: the ``outcome`` label values of ``webhook_deliveries_total``.
ATTEMPT_ACTIONS = (Action.ACK, Action.RETRY, Action.DEAD_LETTER)


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt came to: an HTTP status, or the kind of error that prevented one."""

    status: int | None = None
    error: ErrorKind | None = None
    detail: str = ""
    retry_after_s: float | None = None
    duration_s: float = 0.0

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def endpoint_unavailable(self) -> bool:
        """What the circuit breaker counts: the endpoint could not take the event at all
        (server error, overload, timeout, network). A 4xx means it is up and chose to
        refuse this event: retries and the dead-letter queue handle that. A refused
        destination and Hookline's own failures say nothing about the endpoint."""
        if self.status is not None:
            return self.status >= 500 or self.status in UNAVAILABLE_STATUSES
        return self.error not in (None, ErrorKind.BLOCKED_DESTINATION, ErrorKind.HANDLER_ERROR)

    @property
    def last_status(self) -> str:
        """The ``hookline-last-status`` value: the HTTP status or the error kind."""
        return str(self.status) if self.status is not None else (self.error or "none")

    @property
    def status_class(self) -> str:
        """A small fixed label set for metrics: ``2xx``..``5xx`` or the error kind."""
        if self.status is not None:
            return f"{self.status // 100}xx" if 100 <= self.status < 600 else "other"
        return self.error or "other"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float | None = None
    reason: Reason | None = None


DELIVERED = Decision(Action.ACK)
FILTERED = Decision(Action.FILTER)
