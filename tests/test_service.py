"""Worker lifecycle: health endpoints, metrics, broker outage at start, graceful drain."""

from __future__ import annotations

import asyncio
import time

import aiohttp

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
from worker.metrics import Metrics
from worker.service import Worker
from worker.topology import endpoint_queue


async def get(port: int | None, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as r,
    ):
        return r.status, await r.text()


async def test_health_ready_and_metrics(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """/healthz and /readyz answer 200 while consuming; /metrics has the contract series."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("ok", receiver.url("/ok"), ["m.*"]),
            endpoint("bad", receiver.url("/bad"), ["m.*"]),
        ],
        retry={"delays_s": [0.1]},
        metrics={"queue_poll_s": 0.2},
    )
    receiver.script("/bad", 500)
    worker = await run_worker(settings)
    port = worker.health.port
    assert (await get(port, "/healthz"))[0] == 200
    assert (await get(port, "/readyz"))[0] == 200
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        await publisher.publish("m.x", {})
    await receiver.wait_for(lambda: len(receiver.on("/bad")) == 2 and len(receiver.on("/ok")) == 1)
    await asyncio.sleep(0.3)
    status, text = await get(port, "/metrics")
    assert status == 200
    expected = [
        'webhook_deliveries_total{endpoint="ok",outcome="delivered"} 1.0',
        'webhook_deliveries_total{endpoint="bad",outcome="retried"} 1.0',
        'webhook_deliveries_total{endpoint="bad",outcome="dead_lettered"} 1.0',
        'webhook_dead_lettered_total{endpoint="bad",reason="attempts_exhausted"} 1.0',
        'webhook_attempts_total{endpoint="bad",status_class="5xx"} 2.0',
        'webhook_delivery_duration_seconds_count{endpoint="ok"} 1.0',
        'webhook_end_to_end_seconds_count{endpoint="ok"} 1.0',
        'webhook_in_flight{endpoint="ok"} 0.0',
        "webhook_broker_connected 1.0",
        "webhook_worker_ready 1.0",
        "webhook_dead_letter_messages 1.0",
        "webhook_unrouted_messages 0.0",
        'webhook_backlog_messages{endpoint="ok"} 0.0',
        'webhook_retry_waiting_messages{endpoint="bad"} 0.0',
    ]
    for line in expected:
        assert line in text, line
    assert "127.0.0.1" not in text  # no URL ever becomes a label
    assert "evt_" not in text


async def test_unreachable_broker_at_start_is_retried_not_fatal() -> None:
    """With no broker, the worker keeps retrying with /readyz 503 and stops cleanly on request."""
    settings = make_settings(
        "hl-unreachable",
        [endpoint("e", "http://127.0.0.1/", ["#"])],
        broker={"url": "amqp://guest:guest@127.0.0.1:1/"},
    )
    worker = Worker(settings, Metrics())
    task = asyncio.create_task(worker.run())

    async def serving() -> bool:
        return worker.health.port is not None

    await eventually(serving)
    await asyncio.sleep(1.5)  # several connection attempts
    assert not task.done()
    assert (await get(worker.health.port, "/healthz"))[0] == 200
    status, body = await get(worker.health.port, "/readyz")
    assert (status, "not ready" in body) == (503, True)
    worker.request_stop()
    await asyncio.wait_for(task, timeout=5)


async def test_stop_drains_in_flight_and_returns_the_rest(
    exchange_name: str, receiver: Receiver, broker: Broker, run_worker: RunWorker
) -> None:
    """On stop, started deliveries finish and are acked; unstarted ones stay queued."""
    settings = make_settings(
        exchange_name,
        [endpoint("slow", receiver.url("/slow"), ["d.*"], max_in_flight=3)],
        worker={"shutdown_timeout_s": 10},
    )
    receiver.script("/slow", (200, {}, 1.0))
    worker = await run_worker(settings)
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        for index in range(10):
            await publisher.publish("d.x", {"i": index})
    await receiver.wait_for(lambda: len(receiver.requests) == 3)
    stopping = asyncio.create_task(run_worker.stop(worker, timeout_s=10))
    await asyncio.sleep(0)
    assert not worker.is_ready()
    await stopping
    assert len(receiver.requests) == 3  # nothing new started after the stop
    assert await broker.depth(endpoint_queue(exchange_name, "slow")) == 7
    delivered = worker.metrics.deliveries.labels(endpoint="slow", outcome="delivered")
    assert delivered._value.get() == 3


async def test_stop_is_bounded_by_shutdown_timeout(
    exchange_name: str, receiver: Receiver, broker: Broker, run_worker: RunWorker
) -> None:
    """A delivery that outlives shutdown_timeout_s is abandoned unacked and redelivered later."""
    settings = make_settings(
        exchange_name,
        [endpoint("hang", receiver.url("/hang"), ["h.*"], timeout_s=60)],
        worker={"shutdown_timeout_s": 0.5},
    )
    receiver.script("/hang", (200, {}, 60.0))
    worker = await run_worker(settings)
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        await publisher.publish("h.x", {})
    await receiver.wait_for(lambda: len(receiver.requests) == 1)
    started = time.monotonic()
    await run_worker.stop(worker, timeout_s=10)
    assert time.monotonic() - started < 5
    assert await broker.depth(endpoint_queue(exchange_name, "hang")) == 1
