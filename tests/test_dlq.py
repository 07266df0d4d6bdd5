"""dlq list/replay/purge against a real dead-letter queue filled by a real worker."""

from __future__ import annotations

import asyncio

from producer import Publisher
from tests.conftest import (
    AMQP_URL,
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_settings,
)
from worker import dlq
from worker.settings import Settings
from worker.topology import dead_letter_queue


async def fill(settings: Settings, receiver: Receiver, broker: Broker) -> list[str]:
    """Publish 3 events that dead-letter at 'a' and 2 at 'b' (both answer 410)."""
    receiver.script("/a", 410)
    receiver.script("/b", 410)
    async with Publisher(AMQP_URL, settings.broker.exchange) as publisher:
        ids = [await publisher.publish("to.a", {"i": i}) for i in range(3)]
        ids += [await publisher.publish("to.b", {"i": i}) for i in range(2)]
    queue = dead_letter_queue(settings.broker.exchange)

    async def all_dead() -> bool:
        return await broker.depth(queue) == 5

    await eventually(all_dead)
    return ids


def two_endpoints(exchange: str, receiver: Receiver) -> Settings:
    return make_settings(
        exchange,
        [
            endpoint("a", receiver.url("/a"), ["to.a"]),
            endpoint("b", receiver.url("/b"), ["to.b"]),
        ],
    )


async def test_list_shows_fields_and_filters_without_consuming(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """list shows id, type, endpoint, reason, attempts, last status, time; it removes nothing."""
    settings = two_endpoints(exchange_name, receiver)
    await run_worker(settings)
    ids = await fill(settings, receiver, broker)
    letters = await dlq.list_dead_letters(settings)
    assert sorted(letter.event_id for letter in letters) == sorted(ids)
    first = next(letter for letter in letters if letter.endpoint == "a")
    assert (first.event_type, first.reason, first.attempts, first.last_status) == (
        "to.a",
        "no_retry_status",
        "1",
        "410",
    )
    assert first.dead_lettered_at.startswith("20")
    assert len(await dlq.list_dead_letters(settings, endpoint="b")) == 2
    assert len(await dlq.list_dead_letters(settings, limit=2)) == 2
    await broker.wait_depth(dead_letter_queue(exchange_name), 5)


async def test_replay_redelivers_with_fresh_attempts(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """replay sends an endpoint's dead letters back to it as attempt 1 and removes them."""
    settings = two_endpoints(exchange_name, receiver)
    await run_worker(settings)
    await fill(settings, receiver, broker)
    receiver.script("/a", 200)
    report = await dlq.replay(settings, endpoint="a", limit=2)
    assert len(report.replayed) == 2
    await receiver.wait_for(lambda: len(receiver.on("/a")) == 5)
    await asyncio.sleep(0.3)
    await broker.wait_depth(dead_letter_queue(exchange_name), 3)
    remaining = await dlq.list_dead_letters(settings)
    assert sorted(letter.endpoint for letter in remaining) == ["a", "b", "b"]


async def test_replay_leaves_letters_of_unknown_endpoints(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """Dead letters of an endpoint no longer configured stay in the queue."""
    settings = two_endpoints(exchange_name, receiver)
    await run_worker(settings)
    await fill(settings, receiver, broker)
    only_a = make_settings(exchange_name, [endpoint("a", receiver.url("/a"), ["to.a"])])
    receiver.script("/a", 200)
    report = await dlq.replay(only_a)
    assert (len(report.replayed), report.skipped_unknown_endpoint) == (3, 2)
    await broker.wait_depth(dead_letter_queue(exchange_name), 2)


async def test_purge_by_endpoint_and_all(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """purge removes one endpoint's dead letters, or all of them."""
    settings = two_endpoints(exchange_name, receiver)
    await run_worker(settings)
    await fill(settings, receiver, broker)
    assert await dlq.purge(settings, endpoint="b") == 2
    await broker.wait_depth(dead_letter_queue(exchange_name), 3)
    assert await dlq.purge(settings) == 3
    await broker.wait_depth(dead_letter_queue(exchange_name), 0)
