"""Queue names are the public contract; declaring is idempotent and conflicts are explained."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from structlog.testing import capture_logs

from producer import headers
from tests.conftest import (
    AMQP_URL,
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_settings,
    publish_events,
)
from tests.helpers import strand_in_legacy_tier
from worker.dlq import DeadLetter
from worker.exceptions import TopologyConflict
from worker.settings import RetrySettings
from worker.topology import (
    count_waiting,
    dead_letter_overflow_queue,
    dead_letter_queue,
    dead_letter_queue_arguments,
    declare_all,
    delay_exchange,
    delay_label,
    delay_queue,
    delay_tier_manifest_queue,
    endpoint_of_work_queue,
    endpoint_queue,
    inspect_queue,
    is_delay_queue,
    known_delay_tiers,
    legacy_dead_letter_queue_arguments,
    legacy_delay_queue,
    legacy_work_queue_arguments,
    queue_names,
    record_delay_tiers,
    retry_exchange,
    retry_orphans_exchange,
    unrouted_queue,
    work_queue_arguments,
)


def test_names_follow_the_contract() -> None:
    """Every queue is '<exchange>.<...>'; dead letters go to exactly '<exchange>.dead-letter',
    with its overflow queue and the delay-tier manifest beside it."""
    assert dead_letter_queue("webhooks") == "webhooks.dead-letter"
    assert dead_letter_overflow_queue("webhooks") == "webhooks.dead-letter.overflow"
    assert delay_tier_manifest_queue("webhooks") == "webhooks.delay-tiers"
    assert endpoint_queue("webhooks", "billing") == "webhooks.endpoint.billing"
    assert delay_queue("webhooks", 30) == "webhooks.delay.30s"
    assert legacy_delay_queue("webhooks", "billing", 30) == "webhooks.endpoint.billing.delay.30s"
    assert (delay_exchange("webhooks"), retry_exchange("webhooks")) == (
        "webhooks.delay",
        "webhooks.retry",
    )
    assert retry_orphans_exchange("webhooks") == "webhooks.retry.orphans"
    assert is_delay_queue("webhooks.delay.30s", "webhooks")
    assert is_delay_queue("webhooks.delay.250ms", "webhooks")
    assert not is_delay_queue("webhooks.endpoint.billing.delay.30s", "webhooks")
    assert not is_delay_queue("other.delay.30s", "webhooks")
    assert delay_label(0.25) == "250ms"
    assert delay_label(21600) == "21600s"
    settings = make_settings(
        "wh", [endpoint("a", "http://127.0.0.1/", ["#"])], retry={"delays_s": [1, 2, 2]}
    )
    assert queue_names(settings) == [
        "wh.dead-letter",
        "wh.dead-letter.overflow",
        "wh.delay-tiers",
        "wh.unrouted",
        "wh.delay.1s",
        "wh.delay.2s",
        "wh.endpoint.a",
    ]


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_declare_twice_is_idempotent(
    broker: Broker, exchange_name: str, queue_type: str
) -> None:
    """Workers can start in any number and order: declaring again changes nothing (the
    delay-tier manifest holds one message, the recorded tiers)."""
    settings = make_settings(
        exchange_name,
        [endpoint("a", "http://127.0.0.1/", ["x.*"])],
        broker={"queue_type": queue_type},
    )
    manifest = delay_tier_manifest_queue(exchange_name)
    try:
        for _ in range(2):
            await broker.declare(settings)
        for name in queue_names(settings):
            assert await broker.depth(name) == (1 if name == manifest else 0)
    finally:
        await broker.delete_all(settings)


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_a_shared_delay_tier_returns_each_retry_to_its_own_endpoint(
    broker: Broker, exchange_name: str, queue_type: str
) -> None:
    """Retries of two endpoints wait in the same tier, then each reappears in its own
    endpoint's queue after the TTL, routed by the endpoint queue's name."""
    settings = make_settings(
        exchange_name,
        [endpoint("a", "http://127.0.0.1/", ["x.*"]), endpoint("b", "http://127.0.0.1/", ["y.*"])],
        retry={"delays_s": [0.2, 5]},
        broker={"queue_type": queue_type},
    )
    try:
        channel = await broker.connection.channel()
        await declare_all(channel, settings)
        delays = await channel.get_exchange(delay_exchange(exchange_name))
        for name, body in (("a", b'{"to":"a"}'), ("b", b'{"to":"b"}'), ("b", b'{"to":"b2"}')):
            await delays.publish(
                aio_pika.Message(
                    body,
                    headers={headers.RETRY_DELAY: "200ms"},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                endpoint_queue(exchange_name, name),
            )
        await channel.close()
        assert await broker.depth(endpoint_queue(exchange_name, "a")) == 0

        async def arrived() -> bool:
            return [
                await broker.depth(endpoint_queue(exchange_name, name)) for name in ("a", "b")
            ] == [1, 2]

        await eventually(arrived, timeout_s=10)
        assert [m.body for m in await broker.drain(endpoint_queue(exchange_name, "a"))] == [
            b'{"to":"a"}'
        ]
        assert await broker.depth(delay_queue(exchange_name, 5)) == 0
    finally:
        await broker.delete_all(settings)


async def test_a_retry_whose_endpoint_is_gone_becomes_a_dead_letter(
    broker: Broker, exchange_name: str
) -> None:
    """A retry that expires after its endpoint's queue was unbound from the retry exchange
    reaches the dead-letter queue (through the alternate exchange), where the tools read it
    as endpoint_removed from that endpoint: nothing vanishes."""
    settings = make_settings(
        exchange_name, [endpoint("a", "http://127.0.0.1/", ["x.*"])], retry={"delays_s": [0.2]}
    )
    try:
        channel = await broker.connection.channel()
        await declare_all(channel, settings)
        work = await channel.declare_queue(endpoint_queue(exchange_name, "a"), passive=True)
        await work.unbind(retry_exchange(exchange_name), routing_key=work.name)
        delays = await channel.get_exchange(delay_exchange(exchange_name))
        await delays.publish(
            aio_pika.Message(
                b'{"id":"evt_1","type":"x.y"}',
                headers={headers.RETRY_DELAY: "200ms", headers.ATTEMPTS: 1},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            work.name,
        )
        await channel.close()
        await broker.wait_depth(dead_letter_queue(exchange_name), 1, timeout_s=10)
        (letter,) = await broker.drain(dead_letter_queue(exchange_name))
        read = DeadLetter.from_message(letter, exchange_name)
        assert (read.endpoint, read.reason, read.event_id) == ("a", "endpoint_removed", "evt_1")
        assert await broker.depth(work.name) == 0
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


def test_work_queue_names_are_recognised_in_broker_headers() -> None:
    """The endpoint a broker dead letter came from is read off its x-death queue name: work
    queues only, never delay queues or the dead-letter queue, whatever the exchange name."""
    assert endpoint_of_work_queue("wh.endpoint.billing") == "billing"
    assert endpoint_of_work_queue("a.b.endpoint.billing", "a.b") == "billing"
    assert endpoint_of_work_queue("a.b.endpoint.billing", "a") is None
    others = [
        "wh.endpoint.billing.delay.30s",
        "wh.endpoint.billing.upgrading",
        "wh.dead-letter",
        "wh.endpoint.Bad",
        "endpoint.x",
        "wh",
        "",
    ]
    assert [endpoint_of_work_queue(name) for name in others] == [None] * len(others)


async def test_queues_of_an_earlier_hookline_are_used_as_they_are_with_one_warning(
    broker: Broker, exchange_name: str
) -> None:
    """A work queue and dead-letter queue declared by Hookline 0.1.0 (no dead-letter
    exchange) cannot take the new arguments: declaring falls back to theirs, warns once per
    queue naming it and the upgrade command, and leaves them untouched."""
    settings = make_settings(exchange_name, [endpoint("a", "http://127.0.0.1/", ["x.*"])])
    old = [
        (dead_letter_queue(exchange_name), legacy_dead_letter_queue_arguments(settings)),
        (endpoint_queue(exchange_name, "a"), legacy_work_queue_arguments(settings)),
    ]
    channel = await broker.channel()
    try:
        for name, arguments in old:
            await channel.declare_queue(name, durable=True, arguments=arguments)
        with capture_logs() as logs:
            for _ in range(2):
                await declare_all(channel, settings)
        warned = [entry for entry in logs if entry["event"] == "queue_needs_upgrade"]
        assert sorted(entry["queue"] for entry in warned) == sorted(name for name, _ in old)
        assert all("upgrade-queues" in entry["command"] for entry in warned)
        for name, arguments in old:
            await channel.declare_queue(name, durable=True, arguments=arguments)
        assert not channel.is_closed
    finally:
        await channel.close()
        await broker.delete_all(settings)


async def test_a_worker_starts_among_many_endpoints_on_a_few_queues_of_an_earlier_hookline(
    broker: Broker, exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Endpoints start many at a time, their queue declarations tried on probe channels: the
    refusals of a few 0.1.0 queues (each closes the probe it was sent on) are theirs alone.
    No other endpoint is taken for a conflict, the worker starts, and exactly those queues
    are reported as needing an upgrade."""
    hooks = [endpoint(f"e{n}", receiver.url(f"/e{n}"), [f"e{n}.#"]) for n in range(150)]
    settings = make_settings(exchange_name, hooks, worker={"channel_per_endpoint_up_to": 0})
    old = [endpoint_queue(exchange_name, f"e{n}") for n in range(0, 150, 30)]
    channel = await broker.channel()
    try:
        for name in old:
            await channel.declare_queue(
                name, durable=True, arguments=legacy_work_queue_arguments(settings)
            )
        with capture_logs() as logs:
            await run_worker(settings)
        warned = [entry["queue"] for entry in logs if entry["event"] == "queue_needs_upgrade"]
        assert sorted(warned) == sorted(old)
    finally:
        await channel.close()


async def test_new_queues_get_dead_letter_exchanges(broker: Broker, exchange_name: str) -> None:
    """A fresh declare gives the work queue a dead-letter exchange into the dead-letter
    queue, and the dead-letter queue one into its overflow queue: redeclaring with those
    arguments is accepted, and nothing warns."""
    settings = make_settings(exchange_name, [endpoint("a", "http://127.0.0.1/", ["x.*"])])
    try:
        with capture_logs() as logs:
            await broker.declare(settings)
        assert not [entry for entry in logs if entry["event"] == "queue_needs_upgrade"]
        channel = await broker.channel()
        await channel.declare_queue(
            endpoint_queue(exchange_name, "a"),
            durable=True,
            arguments=work_queue_arguments(settings),
        )
        await channel.declare_queue(
            dead_letter_queue(exchange_name),
            durable=True,
            arguments=dead_letter_queue_arguments(settings),
        )
        assert work_queue_arguments(settings)["x-dead-letter-routing-key"] == dead_letter_queue(
            exchange_name
        )
        assert dead_letter_queue_arguments(settings)[
            "x-dead-letter-routing-key"
        ] == dead_letter_overflow_queue(exchange_name)
        await channel.close()
    finally:
        await broker.delete_all(settings)


async def test_concurrent_tier_records_all_survive(broker: Broker, exchange_name: str) -> None:
    """Workers with different schedules recording their delay tiers at the same moment:
    the manifest ends up with every tier (a grow-only union), in one message once read."""
    schedules = [[0.1 * n, 30] for n in range(1, 9)]
    everything = [
        make_settings(
            exchange_name, [endpoint("a", "http://127.0.0.1/", ["x.*"])], retry={"delays_s": delays}
        )
        for delays in schedules
    ]
    channels = [await broker.channel() for _ in everything]
    try:
        await asyncio.gather(
            *(record_delay_tiers(c, s) for c, s in zip(channels, everything, strict=True))
        )
        known = await known_delay_tiers(broker.connection, everything[0])
        assert known == tuple(sorted({round(0.1 * n, 1) for n in range(1, 9)} | {30}))
        assert await broker.depth(delay_tier_manifest_queue(exchange_name)) == 1
    finally:
        for channel in channels:
            await channel.close()
        await broker.delete_all(everything[0])


async def test_count_waiting_includes_legacy_delay_queues_of_every_recorded_tier(
    exchange_name: str, broker: Broker
) -> None:
    """What waits for an endpoint and can be counted without reading it: its work queue
    plus its per-endpoint delay queues of Hookline before 0.2, of every tier recorded for
    the exchange (for the endpoint_removed log line)."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("gone", "http://127.0.0.1/", ["gone.#"]),
            endpoint("keep", "http://127.0.0.1/", ["keep.#"]),
        ],
    )
    try:
        await strand_in_legacy_tier(broker, settings, "gone", 60, 3)
        await publish_events(exchange_name, 2, "gone.event", "queued")
        await broker.wait_depth(endpoint_queue(exchange_name, "gone"), 2)
        assert await count_waiting(broker.connection, settings, "gone") == 5
        assert await count_waiting(broker.connection, settings, "keep") == 0
        assert await count_waiting(broker.connection, settings, "never-declared") == 0
    finally:
        await broker.delete_all(settings)
        await broker.delete_all(
            settings.model_copy(update={"retry": RetrySettings(delays_s=(60,))})
        )


async def test_asking_after_missing_queues_leaves_no_channel_open() -> None:
    """A passive declare of a missing queue closes its channel: inspect_queue uses channels
    the robust connection does not reopen, so twenty questions leave none behind (the API
    asked after every new endpoint's queue, and once ran into channel_max)."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        assert connection.transport is not None
        before = len(connection.transport.connection.channels)
        for n in range(20):
            assert (
                await inspect_queue(connection, f"hl-test-missing-{uuid.uuid4().hex}-{n}") is None
            )
        await asyncio.sleep(0.2)
        assert len(connection.transport.connection.channels) == before
    finally:
        await connection.close()
