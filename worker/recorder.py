"""Recording an outcome on the broker before the original is acked.

Retries and dead-letters are new persistent messages published with confirms; the
original is acked only after the broker has confirmed its copy. Every ``x-`` header is
dropped from the copy: RabbitMQ silently drops messages whose ``x-death`` says they have
been round a dead-letter loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from producer.publisher import publish_confirmed
from worker.retry import Reason
from worker.topology import dead_letter_queue, delay_queue

ATTEMPTS_HEADER = "hookline-attempts"
MAX_DETAIL_CHARS = 512


def attempts_made(headers: Mapping[str, Any] | None) -> int:
    """Attempts already made, from our own header (``x-death`` counts are not reliable)."""
    value = (headers or {}).get(ATTEMPTS_HEADER, 0)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return max(0, min(int(value), 1_000_000))
    except (TypeError, ValueError):
        return 0


def carried_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The publisher's own headers: without ``x-`` (broker) or ``hookline-`` (our state)."""
    return {
        name: value
        for name, value in (headers or {}).items()
        if not name.lower().startswith(("x-", "hookline-"))
    }


def copy_message(original: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    return aio_pika.Message(
        original.body,
        headers=headers,
        content_type=original.content_type or "application/json",
        content_encoding=original.content_encoding,
        message_id=original.message_id,
        correlation_id=original.correlation_id,
        app_id=original.app_id,
        type=original.type,
        timestamp=original.timestamp,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


class Recorder:
    """Publishes retry and dead-letter copies on the worker's confirm channel."""

    def __init__(self, exchange_name: str, default_exchange: AbstractExchange, timeout_s: float):
        self._exchange_name = exchange_name
        self._default_exchange = default_exchange
        self._timeout_s = timeout_s

    async def schedule_retry(
        self, message: AbstractIncomingMessage, endpoint: str, attempt: int, delay_s: float
    ) -> None:
        headers = carried_headers(message.headers)
        headers[ATTEMPTS_HEADER] = attempt
        await publish_confirmed(
            self._default_exchange,
            copy_message(message, headers),
            delay_queue(self._exchange_name, endpoint, delay_s),
            self._timeout_s,
        )

    async def dead_letter(
        self,
        message: AbstractIncomingMessage,
        *,
        endpoint: str,
        reason: Reason,
        attempts: int,
        last_status: str,
        detail: str,
    ) -> None:
        headers = carried_headers(message.headers)
        headers.update(
            {
                "hookline-endpoint": endpoint,
                "hookline-reason": reason.value,
                "hookline-attempts": attempts,
                "hookline-last-status": last_status,
                "hookline-dead-lettered-at": datetime.now(UTC).isoformat(timespec="seconds"),
                "hookline-detail": detail[:MAX_DETAIL_CHARS],
            }
        )
        await publish_confirmed(
            self._default_exchange,
            copy_message(message, headers),
            dead_letter_queue(self._exchange_name),
            self._timeout_s,
        )


async def settle(message: AbstractIncomingMessage, *, requeue: bool | None = None) -> bool:
    """Ack (``requeue=None``) or nack; False when the channel it came on is gone.

    A delivery tag belongs to its channel: after a reconnect the ack cannot be sent, and
    the broker redelivers the message instead. That is a duplicate, never a loss.
    """
    try:
        if requeue is None:
            await message.ack()
        else:
            await message.nack(requeue=requeue)
    except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
        return False
    return True
