"""Operational events: Hookline's own events reach a subscribed endpoint, and never loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.conftest import (
    Broker,
    Receiver,
    RunWorker,
    WorkerProcess,
    endpoint,
    eventually,
    make_document,
    make_settings,
    publish_events,
    write_config,
)
from worker.opsevents import ENDPOINT_FAILING
from worker.settings import settings_from_document
from worker.topology import dead_letter_queue, unrouted_queue


def events_of(receiver: Receiver, path: str, event_type: str) -> list[dict[str, object]]:
    documents = [json.loads(r.body) for r in receiver.on(path)]
    return [d for d in documents if d["type"] == event_type]


async def test_failing_recovered_and_dead_lettered_reach_the_ops_endpoint(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """An endpoint whose circuit opens and closes yields one failing and one recovered
    event; a dead-lettered delivery yields one dead_lettered event naming the event."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("shop", receiver.url("/shop"), ["order.#"], max_in_flight=1),
            endpoint("ops", receiver.url("/ops"), ["hookline.#"]),
        ],
        circuit_breaker={"enabled": True, "failure_threshold": 2, "cooldown_s": 0.5},
        operational_events={"enabled": True},
        retry={"delays_s": [0.2]},
    )
    receiver.script("/shop", 503, 503, 200)
    await run_worker(settings)
    await publish_events(exchange_name, 3, "order.created", "ops")
    await receiver.wait_for(lambda: len(receiver.delivered_ids("/shop")) == 3)
    await receiver.wait_for(
        lambda: len(events_of(receiver, "/ops", "hookline.endpoint.recovered")) == 1
    )
    failing = events_of(receiver, "/ops", "hookline.endpoint.failing")
    assert len(failing) == 1
    assert failing[0]["data"] == {
        "endpoint": "shop",
        "consecutive_failures": 2,
        "last_status": "503",
        "retry_in_s": 0.5,
    }
    recovered = events_of(receiver, "/ops", "hookline.endpoint.recovered")[0]
    assert recovered["data"]["endpoint"] == "shop"  # type: ignore[index]
    assert recovered["data"]["outage_s"] >= 0.5  # type: ignore[index,operator]

    receiver.script("/shop", 410)
    [gone] = await publish_events(exchange_name, 1, "order.cancelled", "gone")
    await receiver.wait_for(
        lambda: len(events_of(receiver, "/ops", "hookline.event.dead_lettered")) == 1
    )
    dead = events_of(receiver, "/ops", "hookline.event.dead_lettered")[0]["data"]
    assert dead == {
        "endpoint": "shop",
        "event_id": gone,
        "event_type": "order.cancelled",
        "reason": "no_retry_status",
        "attempts": 1,
        "last_status": "410",
    }


async def test_a_failing_ops_endpoint_does_not_loop(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """An endpoint subscribed to everything, itself answering 410 to everything, sees the
    event, the two dead_lettered events it causes, and nothing more."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("shop", receiver.url("/shop"), ["order.#"]),
            endpoint("everything", receiver.url("/all"), ["#"]),
        ],
        operational_events={"enabled": True},
    )
    receiver.script("/shop", 410)
    receiver.script("/all", 410)
    await run_worker(settings)
    await publish_events(exchange_name, 1, "order.created", "loop")
    await broker.wait_depth(dead_letter_queue(exchange_name), 4, timeout_s=10)
    await asyncio.sleep(1.5)
    types = sorted(json.loads(r.body)["type"] for r in receiver.on("/all"))
    assert types == ["hookline.event.dead_lettered"] * 2 + ["order.created"]
    assert await broker.depth(dead_letter_queue(exchange_name)) == 4


def logged(worker: WorkerProcess, event_type: str) -> list[dict[str, Any]]:
    """The worker's log records about publishing one operational event type."""
    records = [json.loads(line) for line in worker.log_lines if line.startswith("{")]
    return [
        r
        for r in records
        if r.get("event", "").startswith("operational_event_") and r.get("event_type") == event_type
    ]


async def test_unsubscribed_operational_events_are_returned_not_kept_as_unrouted(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """With no hookline.# subscriber, a circuit opening emits hookline.endpoint.failing,
    which the broker returns (hookline-mandatory) and the worker logs at info as
    operational_event_unsubscribed; <exchange>.unrouted keeps only real unrouted events."""
    document = make_document(
        exchange_name,
        [endpoint("shop", receiver.url("/shop"), ["order.#"], max_in_flight=1)],
        circuit_breaker={"enabled": True, "failure_threshold": 1, "cooldown_s": 60},
        operational_events={"enabled": True},
    )
    receiver.script("/shop", 503)
    settings = settings_from_document(document, Path("test.yaml"), {})
    try:
        async with WorkerProcess(write_config(tmp_path, document)) as worker:
            await worker.wait_for_log("worker_consuming")
            await publish_events(exchange_name, 1, "order.created", "ops")

            async def failing_logged() -> bool:
                return bool(logged(worker, ENDPOINT_FAILING))

            await eventually(failing_logged)
            [record] = logged(worker, ENDPOINT_FAILING)
            assert (record["event"], record["level"]) == ("operational_event_unsubscribed", "info")
            assert record["endpoint"] == "shop"
            # A real unrouted event from a plain AMQP client is still kept.
            await broker.publish(exchange_name, "nobody.listens", b"{}")
            await broker.wait_depth(unrouted_queue(exchange_name), 1)
            await asyncio.sleep(0.5)
            assert await broker.depth(unrouted_queue(exchange_name)) == 1
            assert "operational_event_not_published" not in worker.events()
    finally:
        await broker.delete_all(settings)


async def test_subscribed_operational_events_are_delivered_with_the_mandatory_header(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """Publishing operational events as mandatory changes nothing for a subscriber: the
    failing event reaches it, and nothing lands in <exchange>.unrouted."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("shop", receiver.url("/shop"), ["order.#"], max_in_flight=1),
            endpoint("ops", receiver.url("/ops"), ["hookline.endpoint.*"]),
        ],
        circuit_breaker={"enabled": True, "failure_threshold": 1, "cooldown_s": 60},
        operational_events={"enabled": True},
    )
    receiver.script("/shop", 503)
    await run_worker(settings)
    await publish_events(exchange_name, 1, "order.created", "ops")
    await receiver.wait_for(lambda: len(events_of(receiver, "/ops", ENDPOINT_FAILING)) == 1)
    assert await broker.depth(unrouted_queue(exchange_name)) == 0
