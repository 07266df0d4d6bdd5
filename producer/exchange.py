"""The exchange producers publish to, and where events that match no endpoint go.

``<exchange>`` is a durable topic exchange whose alternate exchange catches what no
endpoint subscribes to:

- events from the SDK carry ``hookline-mandatory: 1``; the alternate exchange routes them to
  ``<exchange>.unrouted.sdk``, an exchange with no bindings, so the broker returns them to the
  publisher (``mandatory``) and the SDK raises :class:`~producer.exceptions.Unroutable`;
- every other event falls through to ``<exchange>.unrouted.capture`` and is kept in the
  bounded queue ``<exchange>.unrouted`` (declared by the worker), where operators can see it.

Exchange arguments must be identical wherever the exchange is declared, so every Hookline
component declares it through :func:`declare_exchange`.
"""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from producer.headers import MANDATORY


def unrouted_exchange(exchange: str) -> str:
    return f"{exchange}.unrouted"


def returned_exchange(exchange: str) -> str:
    return f"{exchange}.unrouted.sdk"


def capture_exchange(exchange: str) -> str:
    return f"{exchange}.unrouted.capture"


def exchange_arguments(exchange: str) -> dict[str, Any]:
    return {"alternate-exchange": unrouted_exchange(exchange)}


async def declare_exchange(channel: AbstractChannel, exchange: str) -> AbstractExchange:
    """Declare ``exchange`` and its alternate-exchange chain; idempotent."""
    unrouted = await channel.declare_exchange(
        unrouted_exchange(exchange),
        aio_pika.ExchangeType.HEADERS,
        durable=True,
        arguments={"alternate-exchange": capture_exchange(exchange)},
    )
    returned = await channel.declare_exchange(
        returned_exchange(exchange), aio_pika.ExchangeType.FANOUT, durable=True
    )
    await channel.declare_exchange(
        capture_exchange(exchange), aio_pika.ExchangeType.FANOUT, durable=True
    )
    # Headers exchanges cannot match "header absent", so SDK events are matched here and
    # everything else falls through to the alternate exchange, the capture queue.
    await returned.bind(unrouted, arguments={"x-match": "all", MANDATORY: "1"})
    return await channel.declare_exchange(
        exchange,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments=exchange_arguments(exchange),
    )
