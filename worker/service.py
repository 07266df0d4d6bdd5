"""The worker's lifecycle: connect, declare, consume, and stop without losing anything."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from producer.connection import connect
from worker.consumer import EndpointConsumer
from worker.delivery import EndpointClient
from worker.depths import poll_depths
from worker.metrics import Metrics
from worker.recorder import Recorder
from worker.server import HealthServer
from worker.settings import Settings
from worker.topology import declare_dead_letter_queue, declare_unrouted_queue

CONNECT_RETRY_FIRST_S = 0.5

log = structlog.get_logger("hookline.worker")


class Worker:
    """Runs until :meth:`request_stop`; then drains and closes in the order that loses nothing.

    Shutdown order: stop consuming, let in-flight deliveries finish (bounded by
    ``worker.shutdown_timeout_s``), close the HTTP sessions, the channels (unacked
    messages return to their queues), then the connections.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.health = HealthServer(
            self.metrics, self.is_ready, settings.metrics.host, settings.metrics.port
        )
        # Created here, not in run(), so a signal that arrives while start-up is still
        # being scheduled is not lost.
        self._stop_requested = asyncio.Event()
        self._consume_connection: AbstractRobustConnection | None = None
        self._publish_connection: AbstractRobustConnection | None = None
        self._channels: list[AbstractChannel] = []
        self._clients: list[EndpointClient] = []
        self._consumers: list[EndpointConsumer] = []
        self._started = False
        self._closing = False  # set while the worker closes its own connections
        self._background: set[asyncio.Task[None]] = set()
        for endpoint in settings.endpoints:
            self.metrics.register_endpoint(endpoint.name)

    def request_stop(self) -> None:
        """Safe to call from a signal handler: it only sets a flag."""
        self._stop_requested.set()

    def is_ready(self) -> bool:
        return (
            self._started
            and not self._stopping
            and all(
                connection is not None and connection.connected.is_set()
                for connection in (self._consume_connection, self._publish_connection)
            )
            and all(consumer.consuming for consumer in self._consumers)
        )

    @property
    def _stopping(self) -> bool:
        return self._stop_requested.is_set()

    async def run(self) -> None:
        await self.health.start()
        log.info("worker_starting", metrics_port=self.health.port,
                 endpoints=[e.name for e in self.settings.endpoints],
                 event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0])  # fmt: skip
        try:
            if await self._connect_with_backoff():
                await self._start_consumers()
                self._started = True
                self.metrics.ready.set(1)
                log.info("worker_consuming", broker=self.settings.broker.masked_url)
                await self._stop_requested.wait()
        finally:
            await self._shutdown()
            await self.health.stop()

    async def _connect_with_backoff(self) -> bool:
        """Connect both connections; False if a stop was requested before the broker answered."""
        delay = CONNECT_RETRY_FIRST_S
        while not self._stopping:
            try:
                self._consume_connection = await self._connect("consume")
                self._publish_connection = await self._connect("publish")
                return True
            except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
                self._closing = True
                await self._close_connections()
                self._closing = False
                log.warning("broker_unreachable", broker=self.settings.broker.masked_url,
                            error=exc.__class__.__name__, retry_in_s=round(delay, 2))  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), timeout=delay)
                delay = min(delay * 2, self.settings.broker.connect_retry_max_s)
                delay *= random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not cryptography
        return False

    async def _connect(self, role: str) -> AbstractRobustConnection:
        # Named so operators (and fault tests) can tell workers' connections apart.
        connection = await connect(
            self.settings.broker, f"hookline-worker {role} {self.settings.broker.exchange}"
        )
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        return connection

    def _on_connection_lost(self, _: Any, exc: BaseException | None = None) -> None:
        self.metrics.broker_connected.set(0)
        if not self._stopping and not self._closing:
            log.warning("broker_connection_lost", error=exc.__class__.__name__ if exc else None)

    def _on_reconnected(self, _: Any) -> None:
        self.metrics.broker_reconnects.inc()
        if self.is_ready():
            self.metrics.broker_connected.set(1)
        log.info("broker_reconnected")

    async def _start_consumers(self) -> None:
        assert self._consume_connection is not None
        assert self._publish_connection is not None
        publish_channel = await self._publish_connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._channels.append(publish_channel)
        await declare_dead_letter_queue(publish_channel, self.settings)
        await declare_unrouted_queue(publish_channel, self.settings)
        recorder = Recorder(
            self.settings.broker.exchange,
            publish_channel.default_exchange,
            self.settings.broker.publish_timeout_s,
        )
        for endpoint in self.settings.endpoints:
            channel = await self._consume_connection.channel()
            self._channels.append(channel)
            client = EndpointClient(self.settings, endpoint)
            self._clients.append(client)
            consumer = EndpointConsumer(
                settings=self.settings,
                endpoint=endpoint,
                channel=channel,
                client=client,
                recorder=recorder,
                metrics=self.metrics,
            )
            self._consumers.append(consumer)
            await consumer.start()
        self.metrics.broker_connected.set(1)
        self._background.add(
            asyncio.create_task(
                poll_depths(self._publish_connection, self.settings, self.metrics),
                name="poll-queue-depths",
            )
        )

    async def _shutdown(self) -> None:
        self._closing = True
        self.metrics.ready.set(0)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for consumer in self._consumers:
            await consumer.stop_consuming()
        in_flight = set().union(*(consumer.in_flight_tasks for consumer in self._consumers))
        if in_flight:
            log.info("worker_draining", in_flight=len(in_flight),
                     timeout_s=self.settings.worker.shutdown_timeout_s)  # fmt: skip
            _, unfinished = await asyncio.wait(
                in_flight, timeout=self.settings.worker.shutdown_timeout_s
            )
            for task in unfinished:
                task.cancel()
            if unfinished:
                # Their messages were not acked, so the broker hands them out again.
                log.warning("worker_drain_timed_out", abandoned=len(unfinished))
                await asyncio.wait(unfinished, timeout=5)
        for client in self._clients:
            await client.close()
        for channel in reversed(self._channels):
            await _close_quietly(channel)
        await self._close_connections()
        self.metrics.broker_connected.set(0)
        log.info("worker_stopped")

    async def _close_connections(self) -> None:
        for connection in (self._consume_connection, self._publish_connection):
            if connection is not None:
                await _close_quietly(connection)
        self._consume_connection = self._publish_connection = None


async def _close_quietly(closable: AbstractChannel | AbstractRobustConnection) -> None:
    try:
        await closable.close()
    except Exception as exc:  # noqa: BLE001 - closing what may already be broken
        log.debug("close_failed", error=exc.__class__.__name__)
