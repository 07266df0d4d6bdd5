"""Consume channels: one per endpoint up to the threshold, shared beyond it, each consumer
keeping its own prefetch, and a refused declaration never closing a shared channel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from structlog.testing import capture_logs

from producer.connection import connect
from tests.conftest import (
    Broker,
    BrokerControl,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_document,
    make_settings,
    publish_events,
    run_python,
    write_config,
)
from tests.helpers import consumers_of, is_ready, reloading_worker, was_logged
from worker.channels import ConsumeChannel
from worker.topology import endpoint_queue, inspect_queue


async def test_each_endpoint_has_a_channel_of_its_own_up_to_the_threshold(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """With no more endpoints than worker.channel_per_endpoint_up_to, every consumer is on
    a channel of its own, with its endpoint's prefetch."""
    settings = make_settings(
        exchange_name,
        [
            endpoint(f"e{n}", receiver.url(f"/e{n}"), [f"e{n}.#"], max_in_flight=n + 1)
            for n in range(3)
        ],
        worker={"channel_per_endpoint_up_to": 3},
    )
    await run_worker(settings)
    consumers = await consumers_of(exchange_name)
    assert {queue: prefetch for queue, (_, prefetch) in consumers.items()} == {
        endpoint_queue(exchange_name, f"e{n}"): n + 1 for n in range(3)
    }
    assert len({channel for channel, _ in consumers.values()}) == 3


async def test_beyond_the_threshold_consumers_share_channels_by_prefetch(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """Past the threshold, consumers with the same prefetch share a channel and each keeps
    its own prefetch (the broker reports it per consumer); every event to every endpoint is
    delivered and acked on the shared channels, whoever's consumer it came to."""
    prefetches = {"a": 5, "b": 5, "c": 7, "d": 5}
    settings = make_settings(
        exchange_name,
        [
            endpoint(name, receiver.url(f"/{name}"), [f"{name}.#"], max_in_flight=prefetch)
            for name, prefetch in prefetches.items()
        ],
        worker={"channel_per_endpoint_up_to": 2},
    )
    await run_worker(settings)
    consumers = await consumers_of(exchange_name)
    channel = {name: consumers[endpoint_queue(exchange_name, name)][0] for name in prefetches}
    assert {name: consumers[endpoint_queue(exchange_name, name)][1] for name in prefetches} == (
        prefetches
    )
    assert channel["a"] == channel["b"] == channel["d"] != channel["c"]
    for name in prefetches:
        await publish_events(exchange_name, 40, f"{name}.event", name)
    await receiver.wait_for(lambda: all(len(receiver.on(f"/{n}")) == 40 for n in prefetches))

    async def all_acked() -> bool:
        for name in prefetches:
            inspected = await broker.channel()
            try:
                queue = await inspected.declare_queue(
                    endpoint_queue(exchange_name, name), passive=True
                )
                if queue.declaration_result.message_count:
                    return False
            finally:
                await inspected.close()
        return True

    await eventually(all_acked)
    # Nothing unacked either: the consumers' channels hold no delivery back.
    await asyncio.sleep(0.2)
    assert sorted(receiver.delivered_ids("/c")) == sorted(f"c-{n}" for n in range(40))


async def test_a_refused_declaration_does_not_disturb_a_shared_channel(
    exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """A reload adds an endpoint whose queue exists with other arguments: the broker refuses
    it on a probe channel, the reload reports it, and the endpoints already sharing the
    consume channel keep the same channel and keep delivering."""
    a = endpoint("a", receiver.url("/a"), ["a.#"])
    b = endpoint("b", receiver.url("/b"), ["b.#"])
    late = endpoint("late", receiver.url("/late"), ["late.#"])
    shared = {"channel_per_endpoint_up_to": 0}
    worker = reloading_worker(
        make_document(exchange_name, [a, b], worker=shared),
        make_document(exchange_name, [a, b, late], worker=shared),
    )
    channel = await broker.channel()
    conflicting = endpoint_queue(exchange_name, "late")
    await channel.declare_queue(conflicting, durable=True)  # classic: conflicts with quorum
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: is_ready(worker))
        before = await consumers_of(exchange_name)
        with capture_logs() as logs:
            worker.request_reload()
            await eventually(lambda: was_logged(logs, "config_reloaded"))
        [failed] = [entry for entry in logs if entry["event"] == "config_reload_failed"]
        assert failed["endpoint"] == "late"
        assert await consumers_of(exchange_name) == before
        await publish_events(exchange_name, 5, "a.event", "after")
        await receiver.wait_for(
            lambda: receiver.delivered_ids("/a") == [f"after-{n}" for n in range(5)]
        )
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)
        await channel.queue_delete(conflicting)
        await channel.close()
        await broker.delete_all(make_settings(exchange_name, [a, b]))


async def test_a_retired_endpoint_is_not_declared_again_after_a_reconnect(
    tmp_path: Path,
    exchange_name: str,
    receiver: Receiver,
    broker: Broker,
    broker_control: BrokerControl,
) -> None:
    """An endpoint removed by a reload leaves its shared channel for good: once retired
    (its queue deleted), a reconnect restores the other consumers on that channel but does
    not declare the retired endpoint's queue again."""
    keep = endpoint("keep", receiver.url("/keep"), ["keep.#"])
    gone = endpoint("gone", receiver.url("/gone"), ["gone.#"])
    shared = {"channel_per_endpoint_up_to": 0}
    after = make_document(exchange_name, [keep], worker=shared)
    worker = reloading_worker(make_document(exchange_name, [keep, gone], worker=shared), after)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: is_ready(worker))
        with capture_logs() as logs:
            worker.request_reload()
            await eventually(lambda: was_logged(logs, "config_reloaded"))
        code, _, err = await run_python(
            "-m",
            "worker",
            "dlq",
            "retire",
            "--config",
            str(write_config(tmp_path, after)),
            "--endpoint",
            "gone",
        )
        assert code == 0, err
        assert await broker_control.close_connections(f"hookline-worker consume {exchange_name}")
        await eventually(lambda: _consumed(exchange_name, "keep"), timeout_s=30)
        await publish_events(exchange_name, 3, "keep.event", "restored")
        await receiver.wait_for(lambda: len(receiver.on("/keep")) == 3)
        assert await inspect_queue(broker.connection, endpoint_queue(exchange_name, "gone")) is None
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)
        await broker.delete_all(make_settings(exchange_name, [keep, gone]))


async def _consumed(exchange: str, name: str) -> bool:
    return endpoint_queue(exchange, name) in await consumers_of(exchange)


async def test_a_delivery_cut_short_by_a_reload_goes_back_at_once_on_a_shared_channel(
    exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """A replaced consumer's delivery still running past worker.shutdown_timeout_s is
    cancelled; on a shared channel it is nacked back to its queue at once and reaches the
    new consumer, instead of staying unacked until the broker's consumer timeout, and the
    other endpoint on the channel keeps delivering meanwhile."""
    receiver.script("/slow", (200, {}, 30.0))
    slow = endpoint("slow", receiver.url("/slow"), ["slow.#"], timeout_s=60)
    moved = endpoint("slow", receiver.url("/moved"), ["slow.#"], timeout_s=60)
    other = endpoint("other", receiver.url("/other"), ["other.#"])
    sections = {"worker": {"channel_per_endpoint_up_to": 0, "shutdown_timeout_s": 0.5}}
    worker = reloading_worker(
        make_document(exchange_name, [slow, other], **sections),
        make_document(exchange_name, [moved, other], **sections),
    )
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: is_ready(worker))
        await publish_events(exchange_name, 1, "slow.event", "cut")
        await receiver.wait_for(lambda: len(receiver.on("/slow")) == 1)
        worker.request_reload()
        await receiver.wait_for(lambda: receiver.delivered_ids("/moved") == ["cut-0"])
        await publish_events(exchange_name, 5, "other.event", "other")
        await receiver.wait_for(lambda: len(receiver.delivered_ids("/other")) == 5)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)
        await broker.delete_all(make_settings(exchange_name, [slow, other]))


async def test_after_a_reconnect_a_shared_channel_gives_its_consumers_the_group_prefetch(
    exchange_name: str, broker: Broker, broker_control: BrokerControl
) -> None:
    """A robust channel restores every consumer with the last qos it sent. A consumer that
    subscribed with another prefetch (a half-open circuit probes with 1) must not leave that
    behind for the whole channel: after a reconnect the group's consumers have its prefetch."""
    settings = make_settings(exchange_name, [endpoint("a", "http://127.0.0.1/", ["a.#"])])
    connection = await connect(settings.broker, f"hookline-test qos {exchange_name}")
    try:
        shared = ConsumeChannel(await connection.channel(), dedicated=False, prefetch=5)
        names = [f"{exchange_name}.q{n}" for n in range(2)]
        for name, prefetch in zip(names, (5, 1), strict=True):
            queue = await shared.channel.declare_queue(name, auto_delete=True)
            await shared.consume(queue, _ignore, prefetch=prefetch, consumer_tag=f"{name}.consumer")
        assert {q: p for q, (_, p) in (await consumers_of(exchange_name)).items()} == {
            names[0]: 5,
            names[1]: 1,
        }
        assert await broker_control.close_connections(f"hookline-test qos {exchange_name}")

        async def restored() -> bool:
            return len(await consumers_of(exchange_name)) == 2

        await eventually(restored, timeout_s=30)
        prefetches = {q: p for q, (_, p) in (await consumers_of(exchange_name)).items()}
        assert prefetches[names[0]] == 5
    finally:
        await connection.close()


async def _ignore(message: AbstractIncomingMessage) -> None:
    await message.nack(requeue=True)


async def test_a_subscription_cancelled_half_way_leaves_a_shared_channel_open(
    exchange_name: str, broker: Broker
) -> None:
    """aiormq closes a channel whose RPC is cancelled. A consumer stopped while it is
    subscribing (a circuit change interrupted by a reload or a shutdown) must not do that to
    a channel other consumers share: the subscription runs to its end, and a delivery held
    by another consumer on the channel can still be acked."""
    settings = make_settings(exchange_name, [endpoint("a", "http://127.0.0.1/", ["a.#"])])
    connection = await connect(settings.broker, f"hookline-test cancel {exchange_name}")
    try:
        shared = ConsumeChannel(await connection.channel(), dedicated=False, prefetch=5)
        held: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        first = await shared.channel.declare_queue(f"{exchange_name}.q0", auto_delete=True)
        second = await shared.channel.declare_queue(f"{exchange_name}.q1", auto_delete=True)
        await shared.consume(first, held.put, prefetch=5, consumer_tag=f"{exchange_name}.c0")
        await shared.channel.default_exchange.publish(aio_pika.Message(b"{}"), first.name)
        message = await asyncio.wait_for(held.get(), timeout=10)
        subscribing = asyncio.create_task(
            shared.consume(second, _ignore, prefetch=1, consumer_tag=f"{exchange_name}.c1")
        )
        await asyncio.sleep(0)  # its qos RPC is on the wire
        subscribing.cancel()
        await asyncio.gather(subscribing, return_exceptions=True)
        await message.ack()
        await eventually(lambda: _consumed_queue(exchange_name, second.name), timeout_s=10)
        assert not shared.channel.is_closed
        assert await broker.depth(first.name) == 0
    finally:
        await connection.close()


async def _consumed_queue(exchange: str, queue: str) -> bool:
    return queue in await consumers_of(exchange)
