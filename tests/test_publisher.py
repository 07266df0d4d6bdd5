"""The Publisher reports an event as sent only once the broker confirmed it into a queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import aio_pika
import pytest

from examples.publish.plain_aio_pika import publish as plain_publish
from producer import (
    BrokerUnreachable,
    EventSpec,
    NotConfirmed,
    Publisher,
    Unroutable,
    parse_envelope,
)
from tests.conftest import AMQP_URL, Broker, endpoint, make_settings
from tests.faults import BrokerControl, TcpProxy
from worker.topology import endpoint_queue, unrouted_queue


@pytest.fixture
async def declared(broker: Broker, exchange_name: str):  # type: ignore[no-untyped-def]
    settings = make_settings(exchange_name, [endpoint("ep", "http://127.0.0.1/", ["order.*"])])
    await broker.declare(settings)
    yield settings
    await broker.delete_all(settings)


async def test_publish_lands_persistent_and_well_formed(
    declared: object, broker: Broker, exchange_name: str
) -> None:
    """publish() returns the id after the confirm; the message is persistent JSON in the queue."""
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        event_id = await publisher.publish("order.created", {"total": 10}, event_id="ord-1")
    assert event_id == "ord-1"
    [message] = await broker.drain(endpoint_queue(exchange_name, "ep"))
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert message.message_id == "ord-1"
    assert message.routing_key == "order.created"
    document = json.loads(message.body)
    assert document["type"] == "order.created" and document["data"] == {"total": 10}


async def test_unsubscribed_type_is_reported_not_lost(
    declared: object, broker: Broker, exchange_name: str
) -> None:
    """An SDK event no endpoint subscribes to raises Unroutable, is counted, and is not kept."""
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        with pytest.raises(Unroutable, match=r"user\.created"):
            await publisher.publish("user.created", {})
        assert publisher.stats.unroutable == 1
    assert await broker.depth(unrouted_queue(exchange_name)) == 0


async def test_publish_many_confirms_all_in_order(
    declared: object, broker: Broker, exchange_name: str
) -> None:
    """publish_many keeps many confirms in flight and returns ids in input order."""
    specs = [EventSpec("order.tick", {"i": i}, id=f"t-{i}") for i in range(500)]
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        ids = await publisher.publish_many(specs)
    assert ids == [f"t-{i}" for i in range(500)]
    assert await broker.depth(endpoint_queue(exchange_name, "ep")) == 500


async def test_closed_publisher_raises_not_confirmed(declared: object, exchange_name: str) -> None:
    """A publish on a lost connection raises NotConfirmed; nothing is reported as sent."""
    publisher = Publisher(AMQP_URL, exchange_name, confirm_timeout_s=2, retry_for_s=0.5)
    await publisher.connect()
    channel = publisher._channel
    assert channel is not None
    await channel.close()
    with pytest.raises(NotConfirmed):
        await publisher.publish("order.created", {})
    assert (publisher.stats.not_confirmed, publisher.stats.published) == (1, 0)
    assert publisher.stats.retries >= 1
    await publisher.close()


async def test_publisher_repr_masks_password() -> None:
    """The broker password never shows in a repr."""
    assert "s3cret" not in repr(Publisher("amqp://u:s3cret@h/", "x"))


async def test_plain_aio_pika_example_publishes_a_valid_envelope(
    declared: object, broker: Broker, exchange_name: str
) -> None:
    """The README's plain-AMQP example produces a persistent envelope the worker accepts."""
    event_id = await plain_publish(AMQP_URL, exchange_name, "order.created", {"n": 1})
    [message] = await broker.drain(endpoint_queue(exchange_name, "ep"))
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert parse_envelope(message.body, 10_000).id == event_id


async def test_broker_down_raises_within_the_bound_then_recovers(
    declared: object, broker: Broker, exchange_name: str, broker_control: BrokerControl
) -> None:
    """While the broker is down, publish raises NotConfirmed after retry_for_s and reports
    nothing as sent; once it is back, the same Publisher publishes again."""
    async with Publisher(AMQP_URL, exchange_name, confirm_timeout_s=1, retry_for_s=2) as publisher:
        await publisher.publish("order.created", {}, event_id="before")
        await broker_control.stop_app()
        try:
            started = time.monotonic()
            with pytest.raises(NotConfirmed):
                await publisher.publish("order.created", {}, event_id="during")
            waited = time.monotonic() - started
        finally:
            await broker_control.start_app()
        assert 1.5 <= waited <= 10
        assert (publisher.stats.published, publisher.stats.not_confirmed) == (1, 1)
        publisher_after = Publisher(AMQP_URL, exchange_name, confirm_timeout_s=5, retry_for_s=60)
        async with publisher_after:
            await publisher_after.publish("order.created", {}, event_id="after")
        # The same Publisher reconnects by itself (within reconnect_interval_s).
        for _ in range(20):
            with contextlib.suppress(NotConfirmed):
                await publisher.publish("order.created", {}, event_id="after-same-publisher")
                break
        else:
            raise AssertionError("the publisher did not recover")
    messages = await broker.drain(endpoint_queue(exchange_name, "ep"))
    assert sorted(m.message_id for m in messages) == ["after", "after-same-publisher", "before"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_publisher_waits_for_a_broker_that_is_down_when_it_starts(
    declared: object, broker: Broker, exchange_name: str
) -> None:
    """A broker that does not answer yet when a service starts publishing is waited for
    (with backoff) within retry_for_s: the connect succeeds once it answers."""
    port = _free_port()
    front = TcpProxy()
    url = f"amqp://guest:guest@127.0.0.1:{port}/"

    async def broker_appears_later() -> None:
        await asyncio.sleep(1.0)
        await front.start(port=port)

    appearing = asyncio.create_task(broker_appears_later())
    try:
        async with Publisher(url, exchange_name, retry_for_s=20) as publisher:
            await publisher.publish("order.created", {}, event_id="waited")
    finally:
        await appearing
        await front.close()
    [message] = await broker.drain(endpoint_queue(exchange_name, "ep"))
    assert message.message_id == "waited"


async def test_an_unreachable_broker_is_reported_as_hookline_error_after_the_bound() -> None:
    """No broker for the whole retry_for_s: connecting raises BrokerUnreachable, a
    NotConfirmed, once the bound has passed, not the AMQP client's own error at once."""
    url = f"amqp://guest:guest@127.0.0.1:{_free_port()}/"
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable) as raised:
        async with Publisher(url, "hl-nowhere", retry_for_s=1.5):
            pass
    assert 1.4 <= time.monotonic() - started <= 6
    assert isinstance(raised.value, NotConfirmed)
    assert "1.5 s" in str(raised.value)
