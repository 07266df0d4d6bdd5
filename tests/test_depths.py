"""The queue-depth poller: what it counts as waiting for a retry and as dead letters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika

from tests.conftest import Broker, Receiver, RunWorker, eventually
from tests.helpers import strand_in_earlier_tier
from worker.depths import QueueDepths, poll_depths
from worker.metrics import Metrics
from worker.settings import settings_from_document
from worker.topology import dead_letter_overflow_queue


async def test_poll_counts_earlier_delay_tiers_and_the_overflow_queue(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """Events in a tier of an earlier retry schedule count as waiting for a retry; letters in
    the dead-letter overflow queue count as dead letters."""
    _, after = await strand_in_earlier_tier(broker, run_worker, receiver, exchange_name, 3)
    channel = await broker.channel()
    await channel.default_exchange.publish(
        aio_pika.Message(b"{}"), dead_letter_overflow_queue(exchange_name)
    )
    await channel.close()
    settings = settings_from_document(after, Path("after.yaml"), {})
    metrics, depths, stop = Metrics(), QueueDepths(), asyncio.Event()
    poller = asyncio.create_task(
        poll_depths(broker.connection, lambda: settings, metrics, depths, stop)
    )
    try:

        async def polled() -> bool:
            return depths.polled_at is not None

        await eventually(polled)
    finally:
        stop.set()
        await poller
    assert depths.retry_waiting == {"gone": 3, "keep": 0}
    assert (depths.dead_letter, depths.backlog) == (1, {"gone": 0, "keep": 0})
    assert metrics.retry_waiting.labels(endpoint="gone")._value.get() == 3
