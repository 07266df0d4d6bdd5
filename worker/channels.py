"""The channels endpoint consumers run on.

Up to ``worker.channel_per_endpoint_up_to`` endpoints (500 by default), each endpoint has
a channel of its own, as before 0.2: a channel error (the broker closing it) then touches
one endpoint only. Beyond that, a channel per endpoint would run into RabbitMQ's
``channel_max`` (2,047 per connection by default) and costs broker memory per channel, so
consumers share channels, :data:`CONSUMERS_PER_CHANNEL` at most each, grouped by prefetch.

Sharing keeps each endpoint's concurrency bound: RabbitMQ applies ``basic.qos`` (without
``global``) to the consumers started after it on the channel, so each consumer gets its own
prefetch as long as the qos and the consume go together (one lock per channel), and the qos
is only sent when it changes, which grouping by prefetch makes rare.

What a channel error costs when shared: every consumer on it stops receiving until aio-pika's
robust channel reopens it and restores them (a fraction of a second), and their unacked
deliveries are redelivered: duplicates, never losses. To keep that rare, nothing that the
broker may refuse is ever sent on a consume channel: queue declarations whose arguments may
conflict go to :class:`worker.topology.Probe` first, and no RPC on a consume channel is ever
cancelled half-way (aiormq closes a channel whose RPC is cancelled). On restore, a robust
channel applies one prefetch (the last it sent) to all its consumers, so every consume puts
the channel's qos back to its group's prefetch afterwards: after a reconnect each consumer
has its own again, except an endpoint probing a half-open circuit, which gets its full
prefetch early.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from worker.acks import AckCoalescer

CONSUMERS_PER_CHANNEL = 100

log = structlog.get_logger("hookline.channels")

Callback = Callable[[AbstractIncomingMessage], Awaitable[Any]]


class ConsumeChannel:
    """A channel that one or more endpoint consumers subscribe on."""

    def __init__(self, channel: AbstractRobustChannel, *, dedicated: bool, prefetch: int) -> None:
        self.channel = channel
        self.dedicated = dedicated
        self.prefetch_group = prefetch
        # Per channel, not per consumer: a multiple-ack covers every lower tag on the
        # channel, whichever consumer it came to.
        self.acks = AckCoalescer()
        self.users = 0
        self._qos: int | None = None
        self._lock = asyncio.Lock()
        self._subscribing: set[asyncio.Task[None]] = set()

    async def consume(
        self, queue: AbstractQueue, callback: Callback, *, prefetch: int, consumer_tag: str
    ) -> None:
        """Subscribe with ``prefetch``. Never cancelled half-way (aiormq closes a channel
        whose RPC is cancelled, under every consumer on it): if the caller is cancelled, the
        subscription completes and the caller's ``consumer_tag`` cancels it."""
        subscribing = asyncio.ensure_future(
            self._consume(queue, callback, prefetch=prefetch, consumer_tag=consumer_tag)
        )
        self._subscribing.add(subscribing)
        subscribing.add_done_callback(self._subscribing.discard)
        await asyncio.shield(subscribing)

    async def _consume(
        self, queue: AbstractQueue, callback: Callback, *, prefetch: int, consumer_tag: str
    ) -> None:
        async with self._lock:
            await self._set_qos(prefetch)
            await queue.consume(callback, consumer_tag=consumer_tag)
            # Back to the group's prefetch (a half-open circuit probes with 1): a robust
            # channel restores its consumers after a reconnect with the last qos it sent.
            await self._set_qos(self.prefetch_group)

    async def _set_qos(self, prefetch: int) -> None:
        if prefetch != self._qos:
            await self.channel.set_qos(prefetch_count=prefetch)
            self._qos = prefetch

    def forget(self, queue: AbstractQueue) -> None:
        """Stop restoring ``queue`` after a reconnect: its consumer left this channel (a
        retired endpoint's queue would otherwise be declared anew, and every reload would
        leave a queue object behind). Only this object: a consumer that replaced it may
        have declared the same queue on the same channel. aio-pika has no public call."""
        queues = getattr(self.channel, "_queues", None)
        if isinstance(queues, dict) and isinstance(same_name := queues.get(queue.name), set):
            same_name.discard(queue)
            if not same_name:
                del queues[queue.name]


class ChannelPool:
    """Hands out consume channels on the worker's consume connection."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        *,
        dedicated_up_to: int,
        per_channel: int = CONSUMERS_PER_CHANNEL,
    ) -> None:
        self._connection = connection
        self._dedicated_up_to = dedicated_up_to
        self._per_channel = per_channel
        self._shared: list[ConsumeChannel] = []
        self._lock = asyncio.Lock()

    @property
    def channels(self) -> int:
        return len(self._shared)

    async def acquire(self, *, prefetch: int, endpoints: int) -> ConsumeChannel:
        """A channel for one more consumer: its own while the worker has at most
        ``dedicated_up_to`` ``endpoints``, else the least used shared one of its prefetch
        group with room left (a new one if none has)."""
        if endpoints <= self._dedicated_up_to:
            opened = await self._connection.channel()
            dedicated = ConsumeChannel(opened, dedicated=True, prefetch=prefetch)
            dedicated.users = 1
            return dedicated
        async with self._lock:
            candidates = [
                shared
                for shared in self._shared
                if shared.prefetch_group == prefetch
                and shared.users < self._per_channel
                and not shared.channel.is_closed
            ]
            if candidates:
                chosen = min(candidates, key=lambda shared: shared.users)
            else:
                opened = await self._connection.channel()
                chosen = ConsumeChannel(opened, dedicated=False, prefetch=prefetch)
                self._shared.append(chosen)
            chosen.users += 1
            return chosen

    async def release(self, channel: ConsumeChannel, queue: AbstractQueue | None) -> None:
        """One consumer left ``channel`` (its in-flight deliveries settled); a dedicated or
        emptied shared channel is closed."""
        async with self._lock:
            channel.users -= 1
            if queue is not None:
                channel.forget(queue)
            if channel.users > 0:
                return
            if channel in self._shared:
                self._shared.remove(channel)
        await close_quietly(channel.channel)

    async def close(self) -> None:
        async with self._lock:
            shared, self._shared = self._shared, []
        for channel in shared:
            await close_quietly(channel.channel)


async def close_quietly(closable: AbstractChannel | AbstractConnection) -> None:
    try:
        await closable.close()
    except Exception as exc:  # noqa: BLE001 - closing what may already be broken
        log.debug("close_failed", error=exc.__class__.__name__)
