"""Polling queue depths from the broker into gauges and a snapshot for the status page."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from worker.metrics import Metrics
from worker.retry import delay_tiers
from worker.settings import Settings
from worker.topology import dead_letter_queue, delay_queue, endpoint_queue, unrouted_queue

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
            # A fresh channel each time: a failed passive declare closes its channel.
            channel = await connection.channel()
            try:
                await _poll_once(channel, settings, metrics, depths)
            finally:
                await channel.close()
        except Exception as exc:  # noqa: BLE001 - a missed poll only leaves gauges stale
            log.info("queue_depth_poll_skipped", error=exc.__class__.__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.metrics.queue_poll_s)


async def _poll_once(
    channel: AbstractChannel, settings: Settings, metrics: Metrics, depths: QueueDepths
) -> None:
    exchange = settings.broker.exchange
    dead_letter = await _depth(channel, dead_letter_queue(exchange))
    unrouted = await _depth(channel, unrouted_queue(exchange))
    backlog: dict[str, int] = {}
    retry_waiting: dict[str, int] = {}
    for endpoint in settings.endpoints:
        name = endpoint.name
        backlog[name] = await _depth(channel, endpoint_queue(exchange, name))
        retry_waiting[name] = 0
        for delay in delay_tiers(settings.retry):
            retry_waiting[name] += await _depth(channel, delay_queue(exchange, name, delay))
    metrics.dead_letter_depth.set(dead_letter)
    metrics.unrouted_depth.set(unrouted)
    for name, count in backlog.items():
        metrics.backlog.labels(endpoint=name).set(count)
        metrics.retry_waiting.labels(endpoint=name).set(retry_waiting[name])
    depths.dead_letter, depths.unrouted = dead_letter, unrouted
    depths.backlog, depths.retry_waiting = backlog, retry_waiting
    depths.polled_at = time.time()


async def _depth(channel: AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)
