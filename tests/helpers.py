"""Helpers shared by several test modules that are not fixtures: hypothesis strategies for
what a hostile publisher can put in a message, broker policies, stranded retries."""

from __future__ import annotations

import contextlib
import decimal
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from hypothesis import strategies as st

from tests.conftest import (
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    make_document,
    publish_events,
)
from tests.faults import rabbitmqctl
from worker.settings import settings_from_document
from worker.topology import delay_queue


def amqp_field_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Any value a header can decode to: what pamqp hands the worker for each AMQP field type,
    including floats from 64-bit doubles and strings that are not UTF-8 (bytes)."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.decimals(allow_nan=True, allow_infinity=True, places=None),
        st.text(max_size=40),
        st.binary(max_size=40),
        st.datetimes(
            min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
        ),
        st.builds(bytearray, st.binary(max_size=16)),
        st.just(decimal.Decimal("1E+300")),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=10), children, max_size=4),
        ),
        max_leaves=max_leaves,
    )


@contextlib.asynccontextmanager
async def queue_policy(name: str, pattern: str, definition: dict[str, Any]) -> AsyncIterator[None]:
    """A RabbitMQ policy on the queues matching ``pattern`` (anchor it on the test's own
    exchange name), set with rabbitmqctl and always cleared afterwards."""
    await rabbitmqctl(
        "set_policy",
        name,
        pattern,
        json.dumps(definition),
        "--apply-to",
        "queues",
        "--priority",
        "10",
    )
    try:
        yield
    finally:
        await rabbitmqctl("clear_policy", name)


async def strand_in_earlier_tier(
    broker: Broker, run_worker: RunWorker, receiver: Receiver, exchange: str, count: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Endpoints ``gone`` (answers 503) and ``keep``: a worker with ``delays_s: [60]`` puts
    ``count`` events for ``gone`` in its 60 s tier and stops, then a worker with the changed
    schedule ``[0.2]`` starts and stops. Returns both config documents (before, after)."""
    receiver.script("/gone", 503)
    endpoints = [
        endpoint("gone", receiver.url("/gone"), ["gone.#"]),
        endpoint("keep", receiver.url("/keep"), ["keep.#"]),
    ]
    before = make_document(exchange, endpoints, retry={"delays_s": [60]})
    after = make_document(exchange, endpoints, retry={"delays_s": [0.2]})
    worker = await run_worker(settings_from_document(before, Path("before.yaml"), {}))
    await publish_events(exchange, count, "gone.event", "stranded")
    await broker.wait_depth(delay_queue(exchange, "gone", 60), count, timeout_s=15)
    await run_worker.stop(worker)
    await run_worker.stop(await run_worker(settings_from_document(after, Path("after.yaml"), {})))
    return before, after


async def peek_all(broker: Broker, name: str) -> list[AbstractIncomingMessage]:
    """Every message in ``name``, left there (they return when the channel closes)."""
    channel = await broker.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        seen = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            seen.append(message)
        return seen
    finally:
        await channel.close()
