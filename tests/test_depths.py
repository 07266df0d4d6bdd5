"""The queue-depth poller: what it counts as waiting for a retry and as dead letters, and
how it shares the endpoint queues out over rounds, against the real broker."""

from __future__ import annotations

import aio_pika

from tests.conftest import Broker, endpoint, make_settings
from worker.depths import QueueDepths, endpoints_due, poll_round
from worker.metrics import Metrics
from worker.series import OTHER
from worker.topology import (
    dead_letter_overflow_queue,
    delay_queue,
    endpoint_queue,
    legacy_delay_queue,
)


async def put(broker: Broker, queue: str, count: int) -> None:
    channel = await broker.channel()
    try:
        for _ in range(count):
            await channel.default_exchange.publish(aio_pika.Message(b"{}"), queue)
    finally:
        await channel.close()


async def test_poll_counts_shared_tiers_of_every_schedule_and_the_overflow_queue(
    exchange_name: str, broker: Broker
) -> None:
    """Events in a shared tier of an earlier retry schedule count as waiting for a retry,
    by tier; letters in the dead-letter overflow queue count as dead letters; a legacy
    per-endpoint tier is not polled."""
    hooks = [
        endpoint("gone", "http://127.0.0.1/gone", ["gone.#"]),
        endpoint("keep", "http://127.0.0.1/keep", ["keep.#"]),
    ]
    before = make_settings(exchange_name, hooks, retry={"delays_s": [60]})
    after = make_settings(exchange_name, hooks, retry={"delays_s": [0.2]})
    legacy = legacy_delay_queue(exchange_name, "gone", 60)
    await broker.declare(before)
    await broker.declare(after)
    channel = await broker.channel()
    await channel.declare_queue(legacy, durable=True)
    await channel.close()
    try:
        await put(broker, delay_queue(exchange_name, 60), 3)
        await put(broker, dead_letter_overflow_queue(exchange_name), 1)
        await put(broker, legacy, 2)
        await broker.wait_depth(delay_queue(exchange_name, 60), 3)
        metrics, depths = Metrics(), QueueDepths()
        await poll_round(broker.connection, after, metrics, depths)
        assert depths.retry_waiting_by_delay == {"200ms": 0, "60s": 3}
        assert depths.retry_waiting == 3
        assert (depths.dead_letter, depths.backlog) == (1, {"gone": 0, "keep": 0})
        registry = metrics.registry
        assert registry.get_sample_value("webhook_retry_waiting_messages", {"tier": "60s"}) == 3
        assert registry.get_sample_value("webhook_dead_letter_messages") == 1
        assert depths.polled_at is not None
    finally:
        channel = await broker.channel()
        await channel.queue_delete(legacy)
        await channel.close()
        await broker.delete_all(before)
        await broker.delete_all(after)


def test_endpoints_take_turns_in_name_order_and_wrap() -> None:
    """Each round goes on after the last endpoint polled; one removed meanwhile does not
    make anyone skip a turn."""
    names = ["a", "b", "c", "d", "e"]
    assert endpoints_due(names, "", 2) == ["a", "b"]
    assert endpoints_due(names, "b", 2) == ["c", "d"]
    assert endpoints_due(names, "d", 2) == ["e", "a"]
    assert endpoints_due(["a", "c", "d"], "b", 2) == ["c", "d"]
    assert endpoints_due(names, "c", 10) == ["d", "e", "a", "b", "c"]
    assert endpoints_due([], "c", 3) == []


async def test_each_round_polls_a_bounded_share_of_endpoint_queues(
    exchange_name: str, broker: Broker
) -> None:
    """With queue_polls_per_round 3, a round reads the fixed queues, each tier and 3
    endpoint queues: the largest backlog seen, then endpoints taking turns. Their last seen
    backlog is kept between turns, a queue that does not exist counts 0, and the backlog
    gauge sums to the worker's total with only max_endpoint_series endpoints under their
    own name."""
    hooks = [endpoint(f"e{n}", f"http://127.0.0.1/{n}", [f"e{n}.#"]) for n in range(7)]
    declared = make_settings(exchange_name, hooks)
    settings = make_settings(
        exchange_name,
        [*hooks, endpoint("missing", "http://127.0.0.1/m", ["m.#"])],
        metrics={"queue_polls_per_round": 3, "max_endpoint_series": 2},
    )
    await broker.declare(declared)
    try:
        for n in range(7):
            await put(broker, endpoint_queue(exchange_name, f"e{n}"), n + 1)
        await broker.wait_depth(endpoint_queue(exchange_name, "e6"), 7)
        metrics, depths = Metrics(), QueueDepths()
        for each in settings.endpoints:
            metrics.series.register(each)
        seen = []
        for _ in range(4):
            await poll_round(broker.connection, settings, metrics, depths)
            assert depths.queues_polled == 3 + 2 + 3  # fixed, tiers 200ms and 400ms, share
            seen.append(set(depths.backlog))
        # One slot of three goes to the largest backlog seen, two to the turns.
        assert seen[0] == {"e0", "e1", "e2"}
        assert seen[3] == {f"e{n}" for n in range(7)} | {"missing"}
        assert depths.backlog == {f"e{n}": n + 1 for n in range(7)} | {"missing": 0}
        # The largest backlog is read again every round: a change there shows at once.
        await put(broker, endpoint_queue(exchange_name, "e6"), 10)
        await broker.wait_depth(endpoint_queue(exchange_name, "e6"), 17)
        await poll_round(broker.connection, settings, metrics, depths)
        assert depths.backlog["e6"] == 17
        # The first two with the largest backlogs keep their slots: a larger backlog
        # elsewhere (e6) does not move series of the same class around.
        assert sorted(metrics.series.own()) == ["e1", "e2"]
        registry = metrics.registry
        by_label = {
            sample.labels["endpoint"]: sample.value
            for family in registry.collect()
            if family.name == "webhook_backlog_messages"
            for sample in family.samples
        }
        assert by_label == {"e1": 2, "e2": 3, OTHER: sum(depths.backlog.values()) - 5}
    finally:
        await broker.delete_all(settings)
