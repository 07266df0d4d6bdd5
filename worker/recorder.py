"""Recording an outcome on the broker before the original is acked.

Retries and dead-letters are new persistent messages published with confirms; the
original is acked only after the broker has confirmed its copy. The copy's headers come
from :mod:`producer.headers`: no ``x-`` header is ever copied (RabbitMQ silently drops
messages whose ``x-death`` says they have been round a dead-letter loop), and publisher
headers that would not survive re-encoding are left out and named.
"""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from producer import headers
from producer.connection import BROKER_GONE
from producer.publisher import publish_confirmed
from worker.outcomes import Reason
from worker.topology import dead_letter_queue, delay_label, endpoint_queue

MAX_SHORT_STRING_BYTES = 255


def copy_message(
    original: AbstractIncomingMessage, new_headers: dict[str, Any], *, bare: bool = False
) -> aio_pika.Message:
    """A persistent copy of ``original`` with ``new_headers``; the body is never changed.

    Properties are copied only if they can be sent again: a property decoded with
    replacement characters may have grown past the 255 bytes a short string holds.
    ``bare`` copies nothing but the body and ``message_id`` (the last resort when a copy
    could not be encoded at all).
    """
    if bare:
        return aio_pika.Message(
            original.body,
            headers=new_headers,
            content_type="application/json",
            message_id=_short(original.message_id),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
    return aio_pika.Message(
        original.body,
        headers=new_headers,
        content_type=_short(original.content_type) or "application/json",
        content_encoding=_short(original.content_encoding),
        message_id=_short(original.message_id),
        correlation_id=_short(original.correlation_id),
        app_id=_short(original.app_id),
        type=_short(original.type),
        timestamp=original.timestamp,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def _short(value: str | None) -> str | None:
    if value is None or len(value.encode("utf-8", "replace")) > MAX_SHORT_STRING_BYTES:
        return None
    return value


class Recorder:
    """Publishes retry and dead-letter copies on the worker's confirm channel.

    Retries go to the delay exchange (``delays``, which tools that never retry need not
    give), addressed to the endpoint's queue: the tier keeps that routing key when it
    dead-letters the retry into the retry exchange.
    """

    def __init__(
        self,
        exchange_name: str,
        default_exchange: AbstractExchange,
        timeout_s: float,
        *,
        delays: AbstractExchange | None = None,
    ):
        self._exchange_name = exchange_name
        self._default_exchange = default_exchange
        self._delays = delays
        self._timeout_s = timeout_s

    async def schedule_retry(
        self,
        message: AbstractIncomingMessage,
        endpoint: str,
        *,
        attempts: int,
        handler_errors: int,
        delay_s: float,
    ) -> None:
        if self._delays is None:
            raise TypeError("this Recorder was made without the delay exchange")
        copy_headers = headers.retry_headers(
            message.headers,
            attempts=attempts,
            handler_errors=handler_errors,
            tier=delay_label(delay_s),
        )
        await publish_confirmed(
            self._delays,
            copy_message(message, copy_headers),
            endpoint_queue(self._exchange_name, endpoint),
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
        handler_errors: int = 0,
        bare: bool = False,
    ) -> None:
        copy_headers = headers.dead_letter_headers(
            None if bare else message.headers,
            endpoint=endpoint,
            reason=reason.value,
            attempts=attempts,
            last_status=last_status,
            detail=detail,
            handler_errors=handler_errors,
        )
        await publish_confirmed(
            self._default_exchange,
            copy_message(message, copy_headers, bare=bare),
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
    except BROKER_GONE:
        return False
    return True
