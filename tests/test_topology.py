"""Queue names are the public contract; declaring is idempotent and conflicts are explained."""

from __future__ import annotations

import aio_pika
import pytest

from tests.conftest import Broker, endpoint, eventually, make_settings
from worker.exceptions import TopologyConflict
from worker.topology import (
    dead_letter_queue,
    declare_all,
    delay_label,
    delay_queue,
    endpoint_queue,
    queue_names,
    unrouted_queue,
)


def test_names_follow_the_contract() -> None:
    """Every queue is '<exchange>.<...>'; dead letters go to exactly '<exchange>.dead-letter'."""
    assert dead_letter_queue("webhooks") == "webhooks.dead-letter"
    assert endpoint_queue("webhooks", "billing") == "webhooks.endpoint.billing"
    assert delay_queue("webhooks", "billing", 30) == "webhooks.endpoint.billing.delay.30s"
    assert delay_label(0.25) == "250ms"
    assert delay_label(21600) == "21600s"
    settings = make_settings(
        "wh", [endpoint("a", "http://127.0.0.1/", ["#"])], retry={"delays_s": [1, 2, 2]}
    )
    assert queue_names(settings) == [
        "wh.dead-letter",
        "wh.unrouted",
        "wh.endpoint.a",
        "wh.endpoint.a.delay.1s",
        "wh.endpoint.a.delay.2s",
    ]


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_declare_twice_is_idempotent(
    broker: Broker, exchange_name: str, queue_type: str
) -> None:
    """Workers can start in any number and order: declaring again changes nothing."""
    settings = make_settings(
        exchange_name,
        [endpoint("a", "http://127.0.0.1/", ["x.*"])],
        broker={"queue_type": queue_type},
    )
    try:
        for _ in range(2):
            await broker.declare(settings)
        for name in queue_names(settings):
            assert await broker.depth(name) == 0
    finally:
        await broker.delete_all(settings)


async def test_delay_queue_returns_messages_to_the_endpoint_queue(
    broker: Broker, exchange_name: str
) -> None:
    """A message put in a delay queue reappears in the endpoint queue after the TTL."""
    settings = make_settings(
        exchange_name, [endpoint("a", "http://127.0.0.1/", ["x.*"])], retry={"delays_s": [0.2]}
    )
    try:
        channel = await broker.connection.channel()
        await declare_all(channel, settings)
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            delay_queue(exchange_name, "a", 0.2),
        )
        await channel.close()
        assert await broker.depth(endpoint_queue(exchange_name, "a")) == 0

        async def arrived() -> bool:
            return await broker.depth(endpoint_queue(exchange_name, "a")) == 1

        await eventually(arrived, timeout_s=5)
    finally:
        await broker.delete_all(settings)


async def test_conflicting_queue_type_is_a_clear_error(broker: Broker, exchange_name: str) -> None:
    """A queue that exists with other arguments raises TopologyConflict naming it."""
    classic = make_settings(
        exchange_name, [endpoint("a", "http://127.0.0.1/", ["#"])], broker={"queue_type": "classic"}
    )
    quorum = make_settings(exchange_name, [endpoint("a", "http://127.0.0.1/", ["#"])])
    try:
        await broker.declare(classic)
        channel = await broker.connection.channel()
        with pytest.raises(TopologyConflict, match="dead-letter"):
            await declare_all(channel, quorum)
    finally:
        await broker.delete_all(classic)


async def test_unrouted_events_from_other_clients_are_kept_bounded(
    broker: Broker, exchange_name: str
) -> None:
    """Events matching no endpoint, sent without the SDK, are kept in the bounded unrouted queue."""
    settings = make_settings(
        exchange_name,
        [endpoint("a", "http://127.0.0.1/", ["x.*"])],
        broker={"unrouted_max_messages": 3},
    )
    try:
        await broker.declare(settings)
        for index in range(5):
            await broker.publish(exchange_name, "nobody.listens", b'{"n": %d}' % index)
        messages = await broker.drain(unrouted_queue(exchange_name))
        assert [m.body for m in messages] == [b'{"n": 2}', b'{"n": 3}', b'{"n": 4}']
        assert messages[0].routing_key == "nobody.listens"
    finally:
        await broker.delete_all(settings)
