"""Queue names and declarations; every name starts with ``<exchange>.``.

- ``<exchange>``: topic exchange producers publish to.
- ``<exchange>.endpoint.<name>``: one work queue per endpoint, bound with its patterns,
  so a slow endpoint only ever delays its own queue.
- ``<exchange>.endpoint.<name>.delay.<delay>``: one delay queue per endpoint and delay;
  a message waits out the queue's TTL, then dead-letters back to the endpoint's queue
  through the default exchange. No consumer ever reads them.
- ``<exchange>.dead-letter``: where deliveries end when they cannot succeed.
- ``<exchange>.unrouted``: a bounded queue of events that matched no endpoint and were not
  published through the SDK (which gets them returned instead); see ``producer.exchange``.

Work queues have no dead-letter exchange on purpose: RabbitMQ silently drops messages
that dead-letter around a loop with no rejection in it, so retries are republished by the
worker (with confirms) instead of routed by the broker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

from producer.exchange import (
    capture_exchange,
    declare_exchange,
    returned_exchange,
    unrouted_exchange,
)
from worker.exceptions import TopologyConflict
from worker.retry import delay_tiers
from worker.settings import EndpointSettings, Settings

T = TypeVar("T")


def endpoint_queue(exchange: str, endpoint: str) -> str:
    return f"{exchange}.endpoint.{endpoint}"


def delay_label(delay_s: float) -> str:
    milliseconds = round(delay_s * 1000)
    if milliseconds % 1000 == 0:
        return f"{milliseconds // 1000}s"
    return f"{milliseconds}ms"


def delay_queue(exchange: str, endpoint: str, delay_s: float) -> str:
    # Named by delay, not attempt number: queue arguments are immutable, so a changed
    # schedule gets new queues while the old ones keep draining into the endpoint.
    return f"{endpoint_queue(exchange, endpoint)}.delay.{delay_label(delay_s)}"


def dead_letter_queue(exchange: str) -> str:
    return f"{exchange}.dead-letter"


def unrouted_queue(exchange: str) -> str:
    return f"{exchange}.unrouted"


def exchange_names(exchange: str) -> list[str]:
    """Every exchange Hookline declares for ``exchange`` (for clean-up)."""
    return [exchange, unrouted_exchange(exchange), returned_exchange(exchange),
            capture_exchange(exchange)]  # fmt: skip


def queue_names(settings: Settings) -> list[str]:
    """Every queue the worker declares for ``settings`` (for tools and for clean-up)."""
    exchange = settings.broker.exchange
    names = [dead_letter_queue(exchange), unrouted_queue(exchange)]
    for endpoint in settings.endpoints:
        names.append(endpoint_queue(exchange, endpoint.name))
        names.extend(
            delay_queue(exchange, endpoint.name, delay) for delay in delay_tiers(settings.retry)
        )
    return names


def _type_arguments(settings: Settings) -> dict[str, Any]:
    return {"x-queue-type": settings.broker.queue_type}


async def _translating_conflicts(coro: Awaitable[T]) -> T:
    try:
        return await coro
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyConflict(
            f"{exc.args[0] if exc.args else exc}. It was declared earlier with other arguments "
            "(another broker.queue_type, or by a Hookline before 0.1.0 without the unrouted "
            "alternate exchange). Delete it (management UI, or `rabbitmqadmin delete "
            "exchange|queue name=...`) once drained, or set another broker.exchange"
        ) from None


async def declare_unrouted_queue(channel: AbstractChannel, settings: Settings) -> AbstractQueue:
    """The bounded queue that keeps the newest events no endpoint subscribed to."""
    exchange = settings.broker.exchange

    async def declare() -> AbstractQueue:
        await declare_exchange(channel, exchange)
        queue = await channel.declare_queue(
            unrouted_queue(exchange),
            durable=True,
            arguments={
                **_type_arguments(settings),
                "x-max-length": settings.broker.unrouted_max_messages,
                "x-overflow": "drop-head",
            },
        )
        await queue.bind(capture_exchange(exchange))
        return queue

    return await _translating_conflicts(declare())


async def declare_dead_letter_queue(channel: AbstractChannel, settings: Settings) -> AbstractQueue:
    return await _translating_conflicts(
        channel.declare_queue(
            dead_letter_queue(settings.broker.exchange),
            durable=True,
            arguments=_type_arguments(settings),
        )
    )


async def declare_endpoint(
    channel: AbstractChannel, settings: Settings, endpoint: EndpointSettings
) -> AbstractQueue:
    """The exchange, the endpoint's queue, its bindings and its delay queues. Idempotent."""
    return await _translating_conflicts(_declare_endpoint(channel, settings, endpoint))


async def _declare_endpoint(
    channel: AbstractChannel, settings: Settings, endpoint: EndpointSettings
) -> AbstractQueue:
    exchange = await declare_exchange(channel, settings.broker.exchange)
    work_queue = endpoint_queue(settings.broker.exchange, endpoint.name)
    queue = await channel.declare_queue(
        work_queue, durable=True, arguments=_type_arguments(settings)
    )
    for pattern in endpoint.events:
        await queue.bind(exchange, routing_key=pattern)
    for delay in delay_tiers(settings.retry):
        arguments = {
            **_type_arguments(settings),
            "x-message-ttl": round(delay * 1000),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": work_queue,
        }
        if settings.broker.queue_type == "quorum":
            # Quorum queues can dead-letter at-least-once; classic ones only at-most-once.
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
        await channel.declare_queue(
            delay_queue(settings.broker.exchange, endpoint.name, delay),
            durable=True,
            arguments=arguments,
        )
    return queue


async def declare_all(channel: AbstractChannel, settings: Settings) -> None:
    """Everything the worker needs, for tools that run without a worker."""
    await declare_dead_letter_queue(channel, settings)
    await declare_unrouted_queue(channel, settings)
    for endpoint in settings.endpoints:
        await declare_endpoint(channel, settings, endpoint)


async def unbind_patterns(queue: AbstractQueue, exchange: str, patterns: Iterable[str]) -> None:
    """Through the queue object that bound them, so a robust channel forgets them too."""
    for pattern in patterns:
        await queue.unbind(exchange, routing_key=pattern)


async def inspect_queue(connection: AbstractConnection, name: str) -> tuple[int, int] | None:
    """(messages ready, consumers) of an existing queue, or None if there is none.

    Asked on a channel of its own: a passive declare of a missing queue closes its channel.
    """
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()
    result = queue.declaration_result
    return int(result.message_count or 0), int(result.consumer_count or 0)
