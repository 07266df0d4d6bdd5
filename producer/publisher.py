"""Publishing with publisher confirms and mandatory routing, for services and for the worker.

``publish_confirmed`` is the one place where aio-pika publish errors become Hookline errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from producer.connection import BROKER_GONE
from producer.envelope import build_body
from producer.exceptions import BrokerUnreachable, NotConfirmed, PublishError, Unroutable
from producer.exchange import declare_exchange
from producer.headers import MANDATORY, PUBLISHED_AT, now_ms
from producer.settings import BrokerSettings, mask_url

CONTENT_TYPE = "application/json"
RETRY_FIRST_PAUSE_S = 0.2
RETRY_MAX_PAUSE_S = 2.0


def persistent_message(
    body: bytes,
    *,
    message_id: str | None = None,
    headers: Mapping[str, Any] | None = None,
    timestamp: datetime | None = None,
) -> aio_pika.Message:
    """aio-pika messages are transient by default; every Hookline message is persistent."""
    return aio_pika.Message(
        body,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        headers=dict(headers) if headers else None,
        timestamp=timestamp,
    )


async def publish_confirmed(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    timeout_s: float,
) -> None:
    """Publish and wait for the broker's confirm; raise unless the message is safely queued.

    The channel behind ``exchange`` must be opened with ``on_return_raises=True`` so that an
    unroutable message raises instead of coming back through a callback.
    """
    try:
        await exchange.publish(message, routing_key, mandatory=True, timeout=timeout_s)
    except aiormq.exceptions.PublishError as exc:
        raise Unroutable(f"no queue is bound for routing key {routing_key!r}") from exc
    except aiormq.exceptions.DeliveryError as exc:
        raise NotConfirmed(f"broker refused the message for {routing_key!r}") from exc
    except TimeoutError as exc:
        raise NotConfirmed(f"no confirm within {timeout_s}s for {routing_key!r}") from exc
    except BROKER_GONE as exc:
        raise NotConfirmed(f"connection lost while publishing to {routing_key!r}") from exc


@dataclass(slots=True)
class PublisherStats:
    """What a Publisher has done so far; every event ends in exactly one of the first three."""

    published: int = 0
    unroutable: int = 0
    not_confirmed: int = 0
    retries: int = 0


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One event to publish: what ``Publisher.publish_many`` takes."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    timestamp: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # top-level envelope keys


class Publisher:
    """Publishes events onto the Hookline exchange; every successful call was confirmed.

    ``publish`` raises :class:`Unroutable` when no endpoint subscribes to the event type, and
    :class:`NotConfirmed` when the broker did not confirm it within ``retry_for_s`` (a
    connection lost meanwhile is waited for and the publish repeated, so a broker restart
    costs latency, not events). It never reports an unconfirmed event as sent. Connecting
    waits up to ``retry_for_s`` too, then raises :class:`BrokerUnreachable` (a
    ``NotConfirmed``). Use it as ``async with Publisher(url) as publisher``.
    """

    def __init__(
        self,
        url: str,
        exchange: str = "webhooks",
        *,
        confirm_timeout_s: float = 10.0,
        retry_for_s: float = 30.0,
        max_in_flight: int = 100,
        ssl_context: ssl.SSLContext | None = None,
        reconnect_interval_s: float = 1.0,
    ) -> None:
        self._url = url
        self._exchange_name = exchange
        self._confirm_timeout_s = confirm_timeout_s
        self._retry_for_s = retry_for_s
        self._max_in_flight = max_in_flight
        self._ssl_context = ssl_context
        self._reconnect_interval_s = reconnect_interval_s
        self.stats = PublisherStats()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    @classmethod
    def from_settings(cls, broker: BrokerSettings) -> Publisher:
        return cls(
            broker.connection_url(),
            broker.exchange,
            confirm_timeout_s=broker.publish_timeout_s,
            retry_for_s=broker.publish_retry_for_s,
            ssl_context=broker.ssl_context(),
            reconnect_interval_s=broker.reconnect_interval_s,
        )

    def __repr__(self) -> str:
        return f"Publisher({mask_url(self._url)!r}, exchange={self._exchange_name!r})"

    async def connect(self) -> None:
        """Connect and declare the exchange, waiting up to ``retry_for_s`` for a broker that
        does not answer yet (with backoff); then raise :class:`BrokerUnreachable`."""
        deadline = time.monotonic() + self._retry_for_s
        pause_s = RETRY_FIRST_PAUSE_S
        while True:
            try:
                await self._open()
                return
            except aiormq.exceptions.ProbableAuthenticationError as exc:
                await self.close()
                raise PublishError("the broker refused the credentials") from exc
            except BROKER_GONE as exc:
                await self.close()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnreachable(
                        f"broker did not answer within {self._retry_for_s:g} s "
                        f"({exc.__class__.__name__})"
                    ) from exc
                await asyncio.sleep(min(pause_s, remaining))
                pause_s = min(pause_s * 2, RETRY_MAX_PAUSE_S)

    async def _open(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self._url,
            ssl_context=self._ssl_context,
            client_properties={"connection_name": f"hookline-publisher {self._exchange_name}"},
            reconnect_interval=self._reconnect_interval_s,
        )
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        # Declaring is idempotent and lets services publish before any worker has run.
        self._exchange = await declare_exchange(self._channel, self._exchange_name)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None:
            with contextlib.suppress(*BROKER_GONE):
                await connection.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(
        self,
        event_type: str,
        data: dict[str, Any],
        *,
        event_id: str | None = None,
        timestamp: datetime | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Publish one event and return its id once the broker has confirmed it; ``extra``
        adds top-level envelope keys beside ``id``, ``type``, ``timestamp`` and ``data``."""
        event_id, body = build_body(
            event_type, data, event_id=event_id, timestamp=timestamp, extra=extra
        )
        await self.publish_body(event_type, body, event_id=event_id)
        return event_id

    async def publish_body(self, event_type: str, body: bytes, *, event_id: str) -> None:
        """Publish an already serialised envelope (routing key = its type)."""
        if self._exchange is None or self._connection is None:
            raise RuntimeError("Publisher is not connected; use 'async with Publisher(...)'")
        message = persistent_message(
            body, message_id=event_id, headers={MANDATORY: "1", PUBLISHED_AT: now_ms()}
        )
        deadline = time.monotonic() + self._retry_for_s
        pause_s = RETRY_FIRST_PAUSE_S
        while True:
            try:
                await publish_confirmed(
                    self._exchange, message, event_type, self._confirm_timeout_s
                )
            except Unroutable:
                self.stats.unroutable += 1
                raise
            except NotConfirmed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.stats.not_confirmed += 1
                    raise
                # A repeat may duplicate an event whose confirm was lost; at-least-once.
                self.stats.retries += 1
                await asyncio.sleep(min(pause_s, remaining))
                pause_s = min(pause_s * 2, RETRY_MAX_PAUSE_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._connection.connected.wait(), max(0.0, deadline - time.monotonic())
                    )
                continue
            self.stats.published += 1
            return

    async def publish_many(self, events: Iterable[EventSpec]) -> list[str]:
        """Publish with many confirms in flight; ids come back in input order.

        Raises the first failure after every publish has settled, so the caller knows
        that no event is still in doubt when it returns.
        """
        gate = asyncio.Semaphore(self._max_in_flight)

        async def one(spec: EventSpec) -> str:
            async with gate:
                return await self.publish(
                    spec.type,
                    spec.data,
                    event_id=spec.id,
                    timestamp=spec.timestamp,
                    extra=spec.extra,
                )

        results = await asyncio.gather(*(one(spec) for spec in events), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [result for result in results if isinstance(result, str)]
