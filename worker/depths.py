"""Polling queue depths from the broker into gauges, for dashboards and alerts."""

from __future__ import annotations

import asyncio

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from worker.metrics import Metrics
from worker.retry import delay_tiers
from worker.settings import Settings
from worker.topology import dead_letter_queue, delay_queue, endpoint_queue, unrouted_queue

log = structlog.get_logger("hookline.depths")


async def poll_depths(
    connection: AbstractRobustConnection, settings: Settings, metrics: Metrics
) -> None:
    """Every ``metrics.queue_poll_s``, record each queue's depth; runs until cancelled."""
    while True:
        try:
            # A fresh channel each time: a failed passive declare closes its channel.
            channel = await connection.channel()
            try:
                await _poll_once(channel, settings, metrics)
            finally:
                await channel.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a missed poll only leaves gauges stale
            log.info("queue_depth_poll_skipped", error=exc.__class__.__name__)
        await asyncio.sleep(settings.metrics.queue_poll_s)


async def _poll_once(channel: AbstractChannel, settings: Settings, metrics: Metrics) -> None:
    exchange = settings.broker.exchange
    metrics.dead_letter_depth.set(await _depth(channel, dead_letter_queue(exchange)))
    metrics.unrouted_depth.set(await _depth(channel, unrouted_queue(exchange)))
    for endpoint in settings.endpoints:
        name = endpoint.name
        metrics.backlog.labels(endpoint=name).set(
            await _depth(channel, endpoint_queue(exchange, name))
        )
        waiting = 0
        for delay in delay_tiers(settings.retry):
            waiting += await _depth(channel, delay_queue(exchange, name, delay))
        metrics.retry_waiting.labels(endpoint=name).set(waiting)


async def _depth(channel: AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)
