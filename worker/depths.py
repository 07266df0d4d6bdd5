"""Polling queue depths from the broker into gauges and a snapshot for the status page.

Dead letters are those in the dead-letter queue and in its overflow queue. Events waiting
for a retry are those in every delay tier recorded for the exchange, earlier schedules'
included: they still expire into the endpoint's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from worker.metrics import Metrics
from worker.retry import delay_tiers
from worker.settings import Settings
from worker.topology import (
    dead_letter_overflow_queue,
    dead_letter_queue,
    delay_queue,
    endpoint_queue,
    endpoint_queue_names,
    inspect_queues,
    known_delay_tiers,
    unrouted_queue,
)

log = structlog.get_logger("hookline.depths")


@dataclass(slots=True)
class QueueDepths:
    """The last poll's figures; ``None`` until the first poll succeeded."""

    dead_letter: int | None = None
    unrouted: int | None = None
    backlog: dict[str, int] = field(default_factory=dict)
    retry_waiting: dict[str, int] = field(default_factory=dict)
    polled_at: float | None = None  # time.time() of the last successful poll


async def poll_depths(
    connection: AbstractRobustConnection,
    current_settings: Callable[[], Settings],
    metrics: Metrics,
    depths: QueueDepths,
    stop: asyncio.Event,
) -> None:
    """Every ``metrics.queue_poll_s``, record each queue's depth, until ``stop`` is set.

    Settings are read afresh on each round, so endpoints added by a reload are polled too.
    Stopped by the event rather than cancelled: cancelling a channel RPC mid-flight makes
    aiormq close the channel, which sets aio-pika's robust recovery going during shutdown.
    """
    while not stop.is_set():
        settings = current_settings()
        try:
            await _poll_once(connection, settings, metrics, depths)
        except Exception as exc:  # noqa: BLE001 - a missed poll only leaves gauges stale
            log.info("queue_depth_poll_skipped", error=exc.__class__.__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.metrics.queue_poll_s)


async def _poll_once(
    connection: AbstractConnection, settings: Settings, metrics: Metrics, depths: QueueDepths
) -> None:
    exchange = settings.broker.exchange
    configured = set(delay_tiers(settings.retry))
    known = await known_delay_tiers(connection, settings)
    names = [
        dead_letter_queue(exchange),
        dead_letter_overflow_queue(exchange),
        unrouted_queue(exchange),
    ]
    for endpoint in settings.endpoints:
        names += endpoint_queue_names(settings, endpoint.name, known)
    found = await inspect_queues(connection, names)

    def ready(name: str, *, required: bool = True) -> int:
        inspected = found[name]
        if inspected is None:
            if required:
                raise LookupError(f"{name} is missing")
            return 0
        return inspected[0]

    dead_letter = ready(dead_letter_queue(exchange)) + ready(
        dead_letter_overflow_queue(exchange), required=False
    )
    unrouted = ready(unrouted_queue(exchange))
    backlog: dict[str, int] = {}
    retry_waiting: dict[str, int] = {}
    for endpoint in settings.endpoints:
        name = endpoint.name
        backlog[name] = ready(endpoint_queue(exchange, name))
        # An earlier schedule's tier may never have existed for this endpoint.
        retry_waiting[name] = sum(
            ready(delay_queue(exchange, name, delay), required=delay in configured)
            for delay in known
        )
    metrics.dead_letter_depth.set(dead_letter)
    metrics.unrouted_depth.set(unrouted)
    for name, count in backlog.items():
        metrics.backlog.labels(endpoint=name).set(count)
        metrics.retry_waiting.labels(endpoint=name).set(retry_waiting[name])
    depths.dead_letter, depths.unrouted = dead_letter, unrouted
    depths.backlog, depths.retry_waiting = backlog, retry_waiting
    depths.polled_at = time.time()
