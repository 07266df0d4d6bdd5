"""Coalesced acks: many deliveries per basic.ack, and never one that has not finished."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from tests.conftest import Broker
from worker.acks import AckCoalescer


@pytest.fixture
async def delivered(
    broker: Broker, exchange_name: str
) -> AsyncIterator[
    tuple[aio_pika.abc.AbstractChannel, AbstractQueue, list[AbstractIncomingMessage]]
]:
    """Ten messages delivered (unacked) on one channel of a real queue."""
    name = f"{exchange_name}.acks"
    setup = await broker.channel()
    queue = await setup.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    for n in range(10):
        await setup.default_exchange.publish(aio_pika.Message(b"%d" % n), name)
    channel = await broker.channel()
    await channel.set_qos(prefetch_count=10)
    consumer_queue = await channel.declare_queue(name, passive=True)
    messages: list[AbstractIncomingMessage] = []
    all_delivered = asyncio.Event()

    async def collect(message: AbstractIncomingMessage) -> None:
        messages.append(message)
        if len(messages) == 10:
            all_delivered.set()

    await consumer_queue.consume(collect)
    await asyncio.wait_for(all_delivered.wait(), timeout=10)
    try:
        yield channel, queue, messages
    finally:
        await setup.queue_delete(name, if_unused=False, if_empty=False)
        await setup.close()


def coalescer_for(messages: list[AbstractIncomingMessage], **timing: float) -> AckCoalescer:
    """A coalescer that has seen every delivery start, as the consumer's callback does."""
    acks = AckCoalescer(**timing)
    for message in messages:
        acks.started(message)
    return acks


async def test_finished_deliveries_share_one_ack(
    delivered: tuple[aio_pika.abc.AbstractChannel, AbstractQueue, list[AbstractIncomingMessage]],
    broker: Broker,
) -> None:
    """Ten deliveries finishing out of order are acked with a single multiple-ack."""
    channel, queue, messages = delivered
    acks = coalescer_for(messages, flush_delay_s=0.01)
    sent: list[tuple[int, bool]] = []
    real_ack = messages[0].channel.basic_ack

    async def counting_ack(delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        sent.append((delivery_tag, multiple))
        await real_ack(delivery_tag, multiple=multiple, wait=wait)

    messages[0].channel.basic_ack = counting_ack  # type: ignore[method-assign]
    order = [3, 1, 0, 2, 9, 4, 8, 5, 7, 6]
    results = await asyncio.gather(*(acks.ack(messages[i]) for i in order))
    assert all(results)
    assert sent == [(10, True)]
    await channel.close()
    await broker.wait_depth(queue.name, 0)


async def test_a_running_delivery_is_never_covered(
    delivered: tuple[aio_pika.abc.AbstractChannel, AbstractQueue, list[AbstractIncomingMessage]],
    broker: Broker,
) -> None:
    """With deliveries 1 and 5 still running, the others are acked (after the hold) and the
    two running ones go back to the queue when the channel closes."""
    channel, queue, messages = delivered
    acks = coalescer_for(messages, flush_delay_s=0.005, max_hold_s=0.05)
    finished = [m for index, m in enumerate(messages) if index not in (0, 4)]
    results = await asyncio.wait_for(asyncio.gather(*(acks.ack(m) for m in finished)), 5)
    assert all(results)
    await channel.close()
    await broker.wait_depth(queue.name, 2)
    requeued = sorted(m.body for m in await broker.drain(queue.name))
    assert requeued == [b"0", b"4"]


async def test_nacked_deliveries_do_not_block_the_multiple_ack(
    delivered: tuple[aio_pika.abc.AbstractChannel, AbstractQueue, list[AbstractIncomingMessage]],
    broker: Broker,
) -> None:
    """A requeued delivery counts as settled: the acks above it still coalesce."""
    channel, queue, messages = delivered
    acks = coalescer_for(messages, flush_delay_s=0.01)
    await messages[2].nack(requeue=False)
    acks.forget(messages[2])
    rest = [m for index, m in enumerate(messages) if index != 2]
    assert all(await asyncio.gather(*(acks.ack(m) for m in rest)))
    await channel.close()
    await broker.wait_depth(queue.name, 0)


async def test_behind_a_delivery_that_outran_the_hold_acks_go_at_once(
    delivered: tuple[aio_pika.abc.AbstractChannel, AbstractQueue, list[AbstractIncomingMessage]],
    broker: Broker,
) -> None:
    """Delivery 1 has run longer than the hold (a hung endpoint's, on a channel shared with
    others): the deliveries finishing behind it are acked one by one at once instead of
    each waiting out the hold, which would pin every consumer's prefetch window on the
    channel. The bound checked is the hold itself (2 s), not a speed."""
    channel, queue, messages = delivered
    acks = coalescer_for(messages, flush_delay_s=0.005, max_hold_s=2.0)
    await asyncio.sleep(2.1)
    finished = messages[1:]
    results = await asyncio.wait_for(asyncio.gather(*(acks.ack(m) for m in finished)), 1.5)
    assert all(results)
    await channel.close()
    await broker.wait_depth(queue.name, 1)
    assert [m.body for m in await broker.drain(queue.name)] == [b"0"]
