"""Recording outcomes: no ack without a confirmed copy under alarms."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import (
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_settings,
    publish_events,
)
from tests.faults import BrokerControl
from worker.topology import dead_letter_queue


@pytest.mark.parametrize("alarm", ["memory", "disk"])
async def test_resource_alarm_never_acks_an_unconfirmed_retry(
    alarm: str,
    exchange_name: str,
    receiver: Receiver,
    run_worker: RunWorker,
    broker: Broker,
    broker_control: BrokerControl,
) -> None:
    """While an alarm blocks publishing, failed attempts cannot be recorded: the originals
    stay unacked and are retried; once it clears, every event is delivered."""
    settings = make_settings(
        exchange_name,
        [endpoint("ep", receiver.url("/ep"), ["alarm.*"], max_in_flight=10)],
        broker={"publish_timeout_s": 1},
        retry={"delays_s": [0.2]},
    )
    await broker.declare(settings)
    ids = await publish_events(exchange_name, 50, "alarm.tick", alarm)
    endpoint_up = asyncio.Event()
    receiver.deciders["/ep"] = lambda _id, _n: 200 if endpoint_up.is_set() else 503
    alarmed = broker_control.memory_alarm() if alarm == "memory" else broker_control.disk_alarm()
    async with alarmed:
        worker = await run_worker(settings)
        failures = worker.metrics.record_failures.labels(endpoint="ep")

        async def unrecorded() -> bool:
            return failures._value.get() >= 10

        await eventually(unrecorded, timeout_s=30)
        assert await broker.depth(dead_letter_queue(exchange_name)) == 0
        attempts_during_alarm = len(receiver.requests)
    endpoint_up.set()
    await receiver.wait_for(lambda: set(receiver.delivered_ids("/ep")) >= set(ids), timeout_s=60)
    delivered = receiver.delivered_ids("/ep")
    print(
        f"\nRELIABILITY {alarm} alarm: published={len(ids)}, "
        f"unrecorded_outcomes={int(failures._value.get())}, "
        f"attempts_during_alarm={attempts_during_alarm}, delivered={len(set(delivered))}, "
        f"duplicated={len(delivered) - len(set(delivered))}, "
        f"lost={len(set(ids) - set(delivered))}"
    )
