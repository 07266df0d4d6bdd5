"""What the API does on RabbitMQ: an endpoint's queue and bindings exist before the API
answers that the endpoint exists, so an event published right after the answer is queued
for it, whether or not a worker has caught up yet.

Operations run on a small pool of plain (not robust) channels. A robust channel records
every queue and binding made on it and makes them again after a reconnect: here that would
bring back the bindings of endpoints deleted since, and grow with every endpoint created.
A channel the broker closes (a refused or missing queue) is replaced on its next use, and
never affects another request's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel as PlainChannel
from pamqp.commands import Queue

from producer.connection import BROKER_GONE, connect
from worker.channels import close_quietly
from worker.exceptions import BrokerUnavailable, TopologyConflict
from worker.settings import EndpointSettings, Settings
from worker.topology import (
    declare_exchanges,
    endpoint_queue,
    retry_exchange,
    work_queue_arguments,
)

CHANNELS = 8
# A broker operation inside a request gives up after this long; the request then fails
# with 503 and its database transaction rolls back.
OPERATION_TIMEOUT_S = 10.0
# What a broker operation may raise when the broker refuses or is away; each operation
# translates them into BrokerUnavailable, the one error the API answers 503 for.
BROKER_FAILURES: tuple[type[BaseException], ...] = (
    *BROKER_GONE,
    aiormq.exceptions.AMQPError,
    TopologyConflict,
    TimeoutError,
)
T = TypeVar("T")


async def _translated(operation: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(operation, OPERATION_TIMEOUT_S)
    except BROKER_FAILURES as exc:
        raise BrokerUnavailable(f"RabbitMQ: {exc.__class__.__name__}") from None


class Broker:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: AbstractRobustConnection | None = None
        # Robust: the exchanges declared on it come back after a broker restart.
        self._anchor: AbstractChannel | None = None
        self._free: asyncio.Queue[PlainChannel | None] = asyncio.Queue()
        for _ in range(CHANNELS):
            self._free.put_nowait(None)

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.connected.is_set()

    async def start(self) -> None:
        connection = await connect(self._settings.broker, "hookline-api")
        try:
            anchor = await connection.channel()
            await declare_exchanges(anchor, self._settings)
        except BaseException:
            await close_quietly(connection)
            raise
        # Only now: requests meanwhile answer 503 rather than find half a topology.
        self._connection, self._anchor = connection, anchor

    async def close(self) -> None:
        if self._connection is not None:
            await close_quietly(self._connection)
            self._connection = self._anchor = None

    async def declare(self, endpoint: EndpointSettings) -> int:
        """Declare the endpoint's queue and, if it is empty, bind it to its patterns and
        to the retry exchange. Returns the messages it already held (then nothing is
        bound: a deleted endpoint's events are not for a new one)."""

        async def declare() -> int:
            channel = await self._acquire()
            try:
                channel, declared = await self._declared(channel, endpoint.name)
                if declared.message_count:
                    return int(declared.message_count)
                await self._bind(channel, endpoint.name, endpoint.events)
                return 0
            finally:
                self._free.put_nowait(channel)

        return await _translated(declare())

    async def bind(self, name: str, patterns: Iterable[str]) -> None:
        async def bind() -> None:
            channel = await self._acquire()
            try:
                channel, _ = await self._declared(channel, name)
                await self._bind(channel, name, patterns, retry=False)
            finally:
                self._free.put_nowait(channel)

        await _translated(bind())

    async def unbind(self, name: str, patterns: Iterable[str]) -> None:
        """Stops new events for ``patterns`` from reaching the queue (if it exists)."""

        async def unbind() -> None:
            channel = await self._acquire()
            try:
                try:
                    await channel.queue_declare(self._queue(name), passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    return
                for pattern in patterns:
                    await channel.queue_unbind(
                        self._queue(name), self._settings.broker.exchange, routing_key=pattern
                    )
            finally:
                self._free.put_nowait(channel)

        await _translated(unbind())

    async def delete_if_empty(self, name: str) -> None:
        """Remove the endpoint's queue if it holds nothing and nobody consumes it."""

        async def delete() -> None:
            channel = await self._acquire()
            try:
                await channel.queue_delete(self._queue(name), if_unused=True, if_empty=True)
            except (
                aiormq.exceptions.ChannelPreconditionFailed,
                aiormq.exceptions.ChannelNotFoundEntity,
            ):
                pass  # not empty, in use, or gone: it stays (or is already) as it is
            finally:
                self._free.put_nowait(channel)

        await _translated(delete())

    async def queued(self, name: str) -> int | None:
        """Messages ready in the endpoint's queue, or None if it has none."""

        async def queued() -> int | None:
            channel = await self._acquire()
            try:
                declared = await channel.queue_declare(self._queue(name), passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None
            finally:
                self._free.put_nowait(channel)
            return int(declared.message_count or 0)

        return await _translated(queued())

    async def _acquire(self) -> PlainChannel:
        if self._anchor is None:
            raise BrokerUnavailable("RabbitMQ: not connected yet")
        channel = await self._free.get()
        if channel is not None and not channel.is_closed:
            return channel
        try:
            return await self._open()
        except BaseException:
            self._free.put_nowait(None)
            raise

    async def _open(self) -> PlainChannel:
        assert self._anchor is not None
        underlay = await self._anchor.get_underlay_channel()
        return await underlay.connection.channel()

    async def _declared(
        self, channel: PlainChannel, name: str
    ) -> tuple[PlainChannel, Queue.DeclareOk]:
        """The endpoint's queue declared with today's arguments, or, if an earlier Hookline
        declared it with others (which ``python -m worker upgrade-queues`` updates), as it
        is. Returns the channel to go on with: a refusal closes the one it was sent on."""
        queue = self._queue(name)
        try:
            declared = await channel.queue_declare(
                queue, durable=True, arguments=work_queue_arguments(self._settings)
            )
        except aiormq.exceptions.ChannelPreconditionFailed:
            fresh = await self._open()
            try:
                declared = await fresh.queue_declare(queue, passive=True)
            except BaseException:
                await fresh.close()
                raise
            channel = fresh
        return channel, declared

    async def _bind(
        self, channel: PlainChannel, name: str, patterns: Iterable[str], *, retry: bool = True
    ) -> None:
        queue, exchange = self._queue(name), self._settings.broker.exchange
        for pattern in patterns:
            await channel.queue_bind(queue, exchange, routing_key=pattern)
        if retry:
            await channel.queue_bind(queue, retry_exchange(exchange), routing_key=queue)

    def _queue(self, name: str) -> str:
        return endpoint_queue(self._settings.broker.exchange, name)
