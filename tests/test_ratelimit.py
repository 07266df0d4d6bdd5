"""Per-endpoint rate limits: a token bucket that a real worker's deliveries respect."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import generate_latest

from tests.conftest import (
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    make_settings,
    publish_events,
)
from worker.ratelimit import TokenBucket
from worker.topology import endpoint_queue


async def test_bucket_allows_a_tenth_of_a_second_burst_then_paces() -> None:
    """At 100/s, 10 tokens are there at once; the next 20 take about 0.2 s."""
    bucket = TokenBucket(100)
    started = time.monotonic()
    waited = [await bucket.acquire() for _ in range(10)]
    assert not any(waited)
    assert time.monotonic() - started < 0.05
    waited = [await bucket.acquire() for _ in range(20)]
    assert all(waited)
    assert time.monotonic() - started >= 0.19


async def test_concurrent_waiters_share_one_rate() -> None:
    """Fifty coroutines acquiring at once still get at most the rate between them."""
    bucket = TokenBucket(200)
    started = time.monotonic()
    await asyncio.gather(*(bucket.acquire() for _ in range(60)))
    # 20 in the burst, 40 at 200/s.
    assert time.monotonic() - started >= 0.19


async def test_worker_delivers_within_ten_percent_of_the_limit(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """150 events queued at once reach an endpoint limited to 50/s at 45-55 per second,
    while a second endpoint without a limit takes its share at full speed."""
    settings = make_settings(
        exchange_name,
        [
            endpoint(
                "slowed",
                receiver.url("/slowed"),
                ["load.#"],
                rate_limit_per_s=50,
                metrics_detail=True,
            ),
            endpoint("free", receiver.url("/free"), ["load.#"], metrics_detail=True),
        ],
    )
    worker = await run_worker(settings)
    await publish_events(exchange_name, 150, "load.event", "rate")
    await receiver.wait_for(lambda: len(receiver.on("/slowed")) == 150, timeout_s=20)
    slowed = sorted(r.at for r in receiver.on("/slowed"))
    free = sorted(r.at for r in receiver.on("/free"))
    # After the initial burst of 5 tokens, arrivals follow the rate.
    measured = (len(slowed) - 6) / (slowed[-1] - slowed[5])
    assert 45 <= measured <= 55, measured
    assert free[-1] - free[0] < slowed[-1] - slowed[0]
    metrics = generate_latest(worker.metrics.registry).decode()
    assert 'webhook_rate_limit_waits_total{endpoint="slowed"}' in metrics


async def test_waiting_messages_go_back_at_once_when_the_circuit_opens(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """At 1/s, messages prefetched while the first is attempted wait for their token; the
    failure that opens the circuit sends them back to the queue unattempted at once, not
    one by one as their tokens come (docs/operations.md promises this)."""
    receiver.script("/down", 500)
    settings = make_settings(
        exchange_name,
        [endpoint("down", receiver.url("/down"), ["tick.#"], rate_limit_per_s=1)],
        retry={"delays_s": [30]},
        circuit_breaker={"enabled": True, "failure_threshold": 1, "cooldown_s": 30},
    )
    await run_worker(settings)
    await publish_events(exchange_name, 5, "tick.event", "give-way")
    await receiver.wait_for(lambda: len(receiver.requests) == 1)
    opened = time.monotonic()
    await broker.wait_depth(endpoint_queue(exchange_name, "down"), 4, timeout_s=5)
    assert time.monotonic() - opened < 0.5
    await asyncio.sleep(1.5)
    assert len(receiver.requests) == 1
