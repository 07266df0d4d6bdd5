"""dlq list/replay/purge against a real dead-letter queue filled by a real worker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from producer import Publisher
from tests.conftest import (
    AMQP_URL,
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    make_settings,
)
from worker import dlq
from worker.settings import Settings
from worker.topology import dead_letter_queue


@dataclass
class Filled:
    settings: Settings
    ids: list[str]


@pytest.fixture
async def filled(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> Filled:
    """A running worker, and 3 dead letters of endpoint 'a' and 2 of 'b' (both answer 410)."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("a", receiver.url("/a"), ["to.a"]),
            endpoint("b", receiver.url("/b"), ["to.b"]),
        ],
    )
    await run_worker(settings)
    receiver.script("/a", 410)
    receiver.script("/b", 410)
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        ids = [await publisher.publish("to.a", {"i": i}) for i in range(3)]
        ids += [await publisher.publish("to.b", {"i": i}) for i in range(2)]
    await broker.wait_depth(dead_letter_queue(exchange_name), 5, timeout_s=15)
    return Filled(settings, ids)


async def test_list_shows_fields_and_filters_without_consuming(
    filled: Filled, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """list shows id, type, endpoint, reason, attempts, last status, time; it removes nothing."""
    settings = filled.settings
    ids = filled.ids
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
    assert len(await dlq.list_dead_letters(settings, dlq.Selection(endpoint="b"))) == 2
    assert len(await dlq.list_dead_letters(settings, dlq.Selection(limit=2))) == 2
    await broker.wait_depth(dead_letter_queue(exchange_name), 5)


async def test_replay_redelivers_with_fresh_attempts(
    filled: Filled, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """replay sends an endpoint's dead letters back to it as attempt 1 and removes them."""
    settings = filled.settings
    receiver.script("/a", 200)
    report = await dlq.replay(settings, dlq.Selection(endpoint="a", limit=2))
    assert len(report.replayed) == 2
    await receiver.wait_for(lambda: len(receiver.on("/a")) == 5)
    await asyncio.sleep(0.3)
    await broker.wait_depth(dead_letter_queue(exchange_name), 3)
    remaining = await dlq.list_dead_letters(settings)
    assert sorted(letter.endpoint for letter in remaining) == ["a", "b", "b"]


async def test_replay_leaves_letters_of_unknown_endpoints(
    filled: Filled, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """Dead letters of an endpoint no longer configured stay in the queue."""
    only_a = make_settings(exchange_name, [endpoint("a", receiver.url("/a"), ["to.a"])])
    receiver.script("/a", 200)
    report = await dlq.replay(only_a)
    assert (len(report.replayed), report.skipped_unknown_endpoint) == (3, 2)
    await broker.wait_depth(dead_letter_queue(exchange_name), 2)


async def test_purge_by_endpoint_and_all(
    filled: Filled, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """purge removes one endpoint's dead letters, or all of them."""
    settings = filled.settings
    assert await dlq.purge(settings, dlq.Selection(endpoint="b")) == 2
    await broker.wait_depth(dead_letter_queue(exchange_name), 3)
    assert await dlq.purge(settings) == 3
    await broker.wait_depth(dead_letter_queue(exchange_name), 0)
