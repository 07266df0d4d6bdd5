"""``python -m worker upgrade-queues``: queues of an earlier Hookline recreated, nothing lost."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aio_pika

from producer import Publisher
from producer.exchange import declare_exchange
from tests.conftest import (
    AMQP_URL,
    Broker,
    Receiver,
    WorkerProcess,
    endpoint,
    make_document,
    publish_events,
    run_python,
    write_config,
)
from tests.helpers import peek_all, strand_in_legacy_tier
from tests.test_dlq import put_dead_letters
from worker.settings import RetrySettings, Settings, settings_from_document
from worker.topology import (
    dead_letter_queue,
    dead_letter_queue_arguments,
    declare_unrouted_queue,
    delay_queue,
    endpoint_queue,
    inspect_queue,
    legacy_dead_letter_queue_arguments,
    legacy_delay_queue,
    legacy_delay_queue_arguments,
    legacy_work_queue_arguments,
    record_delay_tiers,
    work_queue_arguments,
)
from worker.upgrade import holding_queue

DROPPED_EVENT = {"id": "evt_dropped", "type": "to.a", "data": {}}


async def declare_the_old_way(broker: Broker, settings: Settings) -> None:
    """The topology Hookline 0.1.0 declared: no dead-letter exchange on the work queue and
    the dead-letter queue (delay queues and the unrouted queue are unchanged)."""
    exchange_name = settings.broker.exchange
    channel = await broker.channel()
    try:
        exchange = await declare_exchange(channel, exchange_name)
        await declare_unrouted_queue(channel, settings)
        await channel.declare_queue(
            dead_letter_queue(exchange_name),
            durable=True,
            arguments=legacy_dead_letter_queue_arguments(settings),
        )
        for configured in settings.endpoints:
            queue = await channel.declare_queue(
                endpoint_queue(exchange_name, configured.name),
                durable=True,
                arguments=legacy_work_queue_arguments(settings),
            )
            for pattern in configured.events:
                await queue.bind(exchange, routing_key=pattern)
            for delay in settings.retry.delays_s:
                await channel.declare_queue(
                    legacy_delay_queue(exchange_name, configured.name, delay),
                    durable=True,
                    arguments=legacy_delay_queue_arguments(settings, configured.name, delay),
                )
    finally:
        await channel.close()


async def upgrade(config: Path) -> tuple[int, str, str]:
    return await run_python("-m", "worker", "upgrade-queues", "--config", str(config))


async def test_upgrade_recreates_old_queues_losing_nothing(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """Against 0.1.0's queues a worker runs and warns once per queue; the command refuses
    while it consumes, then recreates the dead-letter queue and the work queue with
    dead-letter exchanges, carrying every message over, while events keep being published
    (mandatory: none is ever unroutable, and every one ends up queued). A second run has
    nothing to do; a new worker does not warn and delivers everything."""
    document = make_document(exchange_name, [endpoint("a", receiver.url("/a"), ["to.a"])])
    config = write_config(tmp_path, document)
    settings = settings_from_document(document, config, {})
    work_queue, dead_letter = endpoint_queue(exchange_name, "a"), dead_letter_queue(exchange_name)
    try:
        await declare_the_old_way(broker, settings)
        letters = await put_dead_letters(broker, exchange_name, 3)
        async with WorkerProcess(config) as old_worker:
            await old_worker.wait_for_log("worker_consuming")
            await publish_events(exchange_name, 1, "to.a", "before")
            await receiver.wait_for(lambda: receiver.delivered_ids("/a") == ["before-0"])
            code, _, err = await upgrade(config)
            assert code == 2 and "stop the workers first" in err
            assert await old_worker.stop() == 0
        warned = [line for line in old_worker.log_lines if "queue_needs_upgrade" in line]
        assert len(warned) == 2
        assert all("upgrade-queues" in line for line in warned)
        assert any(work_queue in line for line in warned)
        assert any(f'"{dead_letter}"' in line for line in warned)

        queued = await publish_events(exchange_name, 5, "to.a", "queued")
        published: list[str] = []
        upgrading = asyncio.create_task(upgrade(config))
        async with Publisher(AMQP_URL, exchange_name) as publisher:
            while not upgrading.done():
                published.append(
                    await publisher.publish("to.a", {}, event_id=f"during-{len(published)}")
                )
                await asyncio.sleep(0.002)
        code, out, err = await upgrading
        assert code == 0, err
        assert f"upgraded {dead_letter}: 3 message(s) carried over" in out
        assert f"upgraded {work_queue}:" in out
        assert len(published) > 20, "events should have been published during the upgrade"

        for name in (holding_queue(work_queue), holding_queue(dead_letter)):
            assert await inspect_queue(broker.connection, name) is None
        channel = await broker.channel()
        await channel.declare_queue(
            work_queue, durable=True, arguments=work_queue_arguments(settings)
        )
        await channel.declare_queue(
            dead_letter, durable=True, arguments=dead_letter_queue_arguments(settings)
        )
        await channel.close()
        assert (await upgrade(config))[1].strip() == "nothing to upgrade"

        kept = await broker.drain(dead_letter)
        assert sorted(m.message_id or "" for m in kept) == letters
        assert {str((m.headers or {})["hookline-reason"]) for m in kept} == {"attempts_exhausted"}
        waiting = [m.message_id for m in await peek_all(broker, work_queue)]
        assert set(waiting) == {*queued, *published}

        async with WorkerProcess(config) as new_worker:
            await new_worker.wait_for_log("worker_consuming")
            await receiver.wait_for(
                lambda: set(receiver.delivered_ids("/a")) >= {*queued, *published}, timeout_s=30
            )
            assert await new_worker.stop() == 0
        assert "queue_needs_upgrade" not in new_worker.events()
    finally:
        await broker.delete_all(settings)
        channel = await broker.channel()
        for name in (holding_queue(work_queue), holding_queue(dead_letter)):
            await channel.queue_delete(name)
        await channel.close()


async def test_retries_in_old_delay_queues_are_delivered_by_a_new_worker(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """Without upgrade-queues: retries waiting in per-endpoint delay queues of Hookline
    before 0.2 expire into their endpoint's queue as before, and a worker of this version
    (which declares only the shared tiers, and leaves the old queue alone) delivers them."""
    document = make_document(exchange_name, [endpoint("a", receiver.url("/a"), ["to.a"])])
    config = write_config(tmp_path, document)
    settings = settings_from_document(document, config, {})
    old_tier = await strand_in_legacy_tier(broker, settings, "a", 2, 3)
    try:
        async with WorkerProcess(config) as worker:
            await worker.wait_for_log("worker_consuming")
            await receiver.wait_for(lambda: len(receiver.on("/a")) == 3, timeout_s=30)
            assert await worker.stop() == 0
        assert sorted(receiver.delivered_ids("/a")) == [f"evt_stranded_{n}" for n in range(3)]
        assert await inspect_queue(broker.connection, old_tier) == (0, 0)
    finally:
        await broker.delete_all(settings.model_copy(update={"retry": RetrySettings(delays_s=(2,))}))
        await broker.delete_all(settings)


async def test_upgrade_moves_old_delay_queues_into_the_shared_tiers(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """upgrade-queues empties per-endpoint delay queues of Hookline before 0.2 into the
    shared tier of the same delay (or, for a delay no longer configured, straight into the
    endpoint's queue), deletes them, and a worker then delivers every one of those events:
    none lost, none left behind."""
    document = make_document(
        exchange_name, [endpoint("a", receiver.url("/a"), ["to.a"])], retry={"delays_s": [5]}
    )
    config = write_config(tmp_path, document)
    settings = settings_from_document(document, config, {})
    configured_tier = await strand_in_legacy_tier(broker, settings, "a", 5, 3)
    dropped = settings.model_copy(update={"retry": RetrySettings(delays_s=(60,))})
    dropped_tier = legacy_delay_queue(exchange_name, "a", 60)
    channel = await broker.channel()
    try:
        await record_delay_tiers(channel, dropped)  # as the worker that declared it did
        await channel.declare_queue(
            dropped_tier, durable=True, arguments=legacy_delay_queue_arguments(dropped, "a", 60)
        )
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps({**DROPPED_EVENT, "timestamp": "2026-01-01T00:00:00Z"}).encode(),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            dropped_tier,
        )
        code, out, err = await upgrade(config)
        assert code == 0, err
        assert f"removed {configured_tier}:" in out
        assert f"removed {dropped_tier}: 1 retry(ies) moved out" in out
        for old in (configured_tier, dropped_tier):
            assert await inspect_queue(broker.connection, old) is None
        async with WorkerProcess(config) as worker:
            await worker.wait_for_log("worker_consuming")
            await receiver.wait_for(lambda: len(receiver.on("/a")) == 4, timeout_s=30)
            assert await worker.stop() == 0
        assert sorted(receiver.delivered_ids("/a")) == [
            "evt_dropped",
            *(f"evt_stranded_{n}" for n in range(3)),
        ]
        assert await broker.depth(delay_queue(exchange_name, 5)) == 0
    finally:
        await channel.close()
        await broker.delete_all(settings)
        await broker.delete_all(dropped)
