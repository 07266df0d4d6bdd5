"""End-to-end delivery through a real worker, RabbitMQ and loopback HTTP receivers."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import hypothesis
import pytest
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from producer import Publisher
from producer.connection import connect
from producer.envelope import build_body
from producer.exchange import declare_exchange
from tests.conftest import (
    AMQP_URL,
    SECRET_A,
    SECRET_B,
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_settings,
    publish_events,
)
from tests.helpers import (
    MARKER_TIME,
    Double,
    FailingResolver,
    as_async,
    consumers_of,
    publish_raw,
    publishable_header_values,
)
from worker.channels import ConsumeChannel
from worker.consumer import EndpointConsumer
from worker.delivery import EndpointClient
from worker.metrics import Metrics
from worker.opsevents import OperationalEvents
from worker.recorder import Recorder
from worker.topology import Probe, dead_letter_queue, delay_exchange, delay_queue, endpoint_queue


async def publish(
    exchange: str, event_type: str, data: dict[str, object] | None = None, **kw: object
) -> str:
    async with Publisher(AMQP_URL, exchange) as publisher:
        return await publisher.publish(event_type, data or {}, **kw)  # type: ignore[arg-type]


async def test_fan_out_reaches_exactly_the_subscribed_endpoints(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """An event reaches every endpoint whose pattern matches its type, and no other."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("orders", receiver.url("/orders"), ["order.*"]),
            endpoint("everything", receiver.url("/all"), ["#"]),
            endpoint("paid", receiver.url("/paid"), ["*.paid", "invoice.#"]),
            endpoint("users", receiver.url("/users"), ["user.created"]),
        ],
    )
    await run_worker(settings)
    created = await publish(exchange_name, "order.created", {"n": 1})
    paid = await publish(exchange_name, "order.paid", {"n": 2})
    deep = await publish(exchange_name, "invoice.line.added", {"n": 3})
    await receiver.wait_for(lambda: len(receiver.requests) == 7)
    await asyncio.sleep(0.3)  # nothing else may arrive
    by_path = {
        path: sorted(r.headers["webhook-id"] for r in receiver.on(path))
        for path in ("/orders", "/all", "/paid", "/users")
    }
    assert by_path == {
        "/orders": sorted([created, paid]),
        "/all": sorted([created, paid, deep]),
        "/paid": sorted([paid, deep]),
        "/users": [],
    }


async def test_requests_are_signed_and_verify_with_standardwebhooks(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Every request carries the contract headers and verifies with either rotated secret."""
    settings = make_settings(
        exchange_name,
        [
            {
                **endpoint("rotating", receiver.url("/hook"), ["a.b"], headers={"X-Team": "core"}),
                "secret": [SECRET_B, SECRET_A],
            },
        ],
    )
    await run_worker(settings)
    event_id = await publish(exchange_name, "a.b", {"hello": "world"}, event_id="evt-fixed-1")
    await receiver.wait_for(lambda: len(receiver.requests) == 1)
    request = receiver.requests[0]
    headers = {name.lower(): value for name, value in request.headers.items()}
    assert headers["webhook-id"] == event_id == "evt-fixed-1"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("Hookline/")
    assert headers["x-team"] == "core"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 10
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET_A, SECRET_B):
        assert Webhook(secret).verify(request.body, headers)["data"] == {"hello": "world"}
    assert json.loads(request.body)["id"] == event_id


async def test_body_is_forwarded_byte_for_byte(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """Extra top-level keys, key order and whitespace reach the endpoint unchanged."""
    settings = make_settings(exchange_name, [endpoint("raw", receiver.url("/raw"), ["x.y"])])
    await run_worker(settings)
    body = (
        b'{"type": "x.y",  "id":"raw-1", "timestamp":"2026-01-01T00:00:00+01:00",'
        b' "data":{}, "extra": [1, 2]}'
    )
    await broker.publish(exchange_name, "x.y", body)
    await receiver.wait_for(lambda: len(receiver.requests) == 1)
    assert receiver.requests[0].body == body


async def test_failures_retry_with_growing_delays_then_dead_letter(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """A failing endpoint gets 1 + len(delays_s) attempts, spaced by the delays, then DLQ."""
    settings = make_settings(
        exchange_name,
        [endpoint("down", receiver.url("/down"), ["e.*"])],
        retry={"delays_s": [0.3, 0.6, 1.2]},
    )
    receiver.script("/down", 500)
    await run_worker(settings)
    event_id = await publish(exchange_name, "e.one")
    await receiver.wait_for(lambda: len(receiver.requests) == 4)
    times = [r.at for r in receiver.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, delay in zip(gaps, [0.3, 0.6, 1.2], strict=True):
        assert delay * 0.9 <= gap <= delay + 1.5, gaps
    assert {r.headers["webhook-id"] for r in receiver.requests} == {event_id}
    queue = dead_letter_queue(exchange_name)
    await eventually(lambda: _has_messages(broker, queue, 1))
    [letter] = await broker.drain(queue)
    headers = letter.headers
    assert headers["hookline-endpoint"] == "down"
    assert headers["hookline-reason"] == "attempts_exhausted"
    assert headers["hookline-attempts"] == 4
    assert headers["hookline-last-status"] == "500"
    assert "hookline-dead-lettered-at" in headers
    # x-delivery-count is added by a quorum queue as the test reads it; x-death would be ours.
    assert not any(name.startswith("x-") for name in headers if name != "x-delivery-count")
    assert json.loads(letter.body)["id"] == event_id
    assert letter.delivery_mode == 2


async def _has_messages(broker: Broker, queue: str, count: int) -> bool:
    return await broker.depth(queue) >= count


async def test_endpoint_recovering_mid_schedule_gets_the_event(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """An endpoint failing twice then answering 2xx gets the event; nothing is dead-lettered."""
    settings = make_settings(exchange_name, [endpoint("flaky", receiver.url("/flaky"), ["f.*"])])
    receiver.script("/flaky", 503, 502, 204)
    worker = await run_worker(settings)
    await publish(exchange_name, "f.x")
    await receiver.wait_for(lambda: len(receiver.requests) == 3)
    await asyncio.sleep(0.5)
    assert len(receiver.requests) == 3
    assert await broker.depth(dead_letter_queue(exchange_name)) == 0
    samples = worker.metrics.deliveries.labels(endpoint="flaky", outcome="delivered")
    assert samples._value.get() == 1


async def test_no_retry_status_dead_letters_at_once(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """A status listed in no_retry_statuses (410 by default) dead-letters after one attempt."""
    settings = make_settings(exchange_name, [endpoint("gone", receiver.url("/gone"), ["g.*"])])
    receiver.script("/gone", 410)
    await run_worker(settings)
    await publish(exchange_name, "g.x")
    queue = dead_letter_queue(exchange_name)
    await eventually(lambda: _has_messages(broker, queue, 1))
    [letter] = await broker.drain(queue)
    assert letter.headers["hookline-reason"] == "no_retry_status"
    assert letter.headers["hookline-last-status"] == "410"
    assert letter.headers["hookline-attempts"] == 1
    assert len(receiver.requests) == 1


async def test_redirects_are_failed_attempts_not_followed(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """A 3xx is a failed attempt; the Location is never requested."""
    settings = make_settings(
        exchange_name,
        [endpoint("moved", receiver.url("/moved"), ["m.*"])],
        retry={"delays_s": [0.1]},
    )
    receiver.script("/moved", (302, {"Location": receiver.url("/elsewhere")}))
    await run_worker(settings)
    await publish(exchange_name, "m.x")
    queue = dead_letter_queue(exchange_name)
    await eventually(lambda: _has_messages(broker, queue, 1))
    assert receiver.on("/elsewhere") == []
    [letter] = await broker.drain(queue)
    assert letter.headers["hookline-last-status"] == "302"


async def test_retry_after_lengthens_the_next_delay(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Retry-After on 429 picks a longer configured delay, never beyond the largest."""
    settings = make_settings(
        exchange_name,
        [endpoint("limited", receiver.url("/limited"), ["r.*"])],
        retry={"delays_s": [0.2, 0.2, 1.5]},
    )
    receiver.script("/limited", (429, {"Retry-After": "1"}), (429, {"Retry-After": "3600"}), 200)
    await run_worker(settings)
    await publish(exchange_name, "r.x")
    await receiver.wait_for(lambda: len(receiver.requests) == 3, timeout_s=20)
    first, second, third = (r.at for r in receiver.requests)
    assert 1.35 <= second - first <= 3.0  # rounded up to the 1.5 s tier, not 0.2 s
    assert 1.35 <= third - second <= 3.0  # capped at the largest delay, not an hour


async def test_invalid_envelopes_are_dead_lettered_while_good_events_flow(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """Each kind of invalid envelope dead-letters at once with its reason; valid ones deliver."""
    settings = make_settings(
        exchange_name,
        [endpoint("ep", receiver.url("/ep"), ["#"])],
        delivery={"max_body_bytes": 2048},
    )
    await run_worker(settings)
    good = [build_body("ok.event", {"i": i})[1] for i in range(3)]
    bad = [
        b"\xff\xfe not utf-8",
        b"not json",
        b"[1, 2, 3]",
        b'{"type": "a.b", "timestamp": "2026-01-01T00:00:00Z", "data": {}}',
        b'{"id": "", "type": "a.b", "timestamp": "2026-01-01T00:00:00Z", "data": {}}',
        b'{"id": 5, "type": "a.b", "timestamp": "2026-01-01T00:00:00Z", "data": {}}',
        b'{"id": "x", "type": "a..b", "timestamp": "2026-01-01T00:00:00Z", "data": {}}',
        b'{"id": "x", "type": "a.b", "timestamp": "yesterday", "data": {}}',
        b'{"id": "x", "type": "a.b", "timestamp": "2026-01-01T00:00:00", "data": {}}',
        b'{"id": "x", "type": "a.b", "timestamp": "2026-01-01T00:00:00Z", "data": []}',
        b'{"id": "x", "type": "a.b", "timestamp": "2026-01-01T00:00:00Z"}',
        b'{"id": "x", "type": "a.b", "timestamp": "2026-01-01T00:00:00Z", "data": {"n": NaN}}',
        build_body("big.event", {"blob": "x" * 4096})[1],
    ]
    for index, body in enumerate(bad):
        await broker.publish(exchange_name, "bad.thing", body, message_id=f"bad-{index}")
        await broker.publish(exchange_name, "ok.event", good[index % 3])
    queue = dead_letter_queue(exchange_name)
    await eventually(lambda: _has_messages(broker, queue, len(bad)))
    await receiver.wait_for(lambda: len(receiver.requests) == len(bad))
    letters = await broker.drain(queue)
    assert sorted(letter.body for letter in letters) == sorted(bad)
    for letter in letters:
        assert letter.headers["hookline-reason"] == "invalid_envelope"
        assert letter.headers["hookline-attempts"] == 0
        assert letter.headers["hookline-detail"]
    assert all(json.loads(r.body)["type"] == "ok.event" for r in receiver.requests)


async def test_hung_endpoint_does_not_slow_another(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """While one endpoint hangs until its timeout on every request, another delivers promptly."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("hung", receiver.url("/hung"), ["load.*"], timeout_s=3, max_in_flight=4),
            endpoint("fast", receiver.url("/fast"), ["load.*"]),
        ],
        retry={"delays_s": [5]},
    )
    receiver.script("/hung", (200, {}, 30.0))
    await run_worker(settings)
    started = time.monotonic()
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        for index in range(200):
            await publisher.publish("load.tick", {"i": index})
    await receiver.wait_for(lambda: len(receiver.on("/fast")) == 200, timeout_s=20)
    elapsed = time.monotonic() - started
    # The hung endpoint's 3 s timeouts would show up as multi-second stalls here.
    assert elapsed < 2.9, elapsed
    assert len(receiver.on("/hung")) <= 4


async def test_blocked_destination_is_dead_lettered_without_retries(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """With the SSRF guard on, a loopback endpoint is never contacted and dead-letters at once."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("literal", receiver.url("/literal"), ["s.*"]),
            endpoint("named", receiver.url("/named").replace("127.0.0.1", "localhost"), ["s.*"]),
        ],
        security={"allow_private_networks": False},
    )
    await run_worker(settings)
    await publish(exchange_name, "s.x")
    queue = dead_letter_queue(exchange_name)
    await eventually(lambda: _has_messages(broker, queue, 2))
    letters = await broker.drain(queue)
    assert {letter.headers["hookline-endpoint"] for letter in letters} == {"literal", "named"}
    assert {letter.headers["hookline-reason"] for letter in letters} == {"blocked_destination"}
    assert receiver.requests == []


async def test_connection_refused_and_timeouts_are_retried(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """Connection errors and timeouts count as failed attempts and end with their error class."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("refused", "http://127.0.0.1:9/nothing-listens", ["t.*"]),
            endpoint("slow", receiver.url("/slow"), ["t.*"], timeout_s=0.3),
        ],
        retry={"delays_s": [0.1]},
    )
    receiver.script("/slow", (200, {}, 5.0))
    await run_worker(settings)
    await publish(exchange_name, "t.x")
    queue = dead_letter_queue(exchange_name)
    await eventually(lambda: _has_messages(broker, queue, 2))
    letters = {m.headers["hookline-endpoint"]: m.headers for m in await broker.drain(queue)}
    assert letters["refused"]["hookline-last-status"] == "connection_error"
    assert letters["slow"]["hookline-last-status"] == "timeout"
    assert letters["slow"]["hookline-attempts"] == 2


async def test_messages_wait_in_endpoint_queue_until_a_worker_starts(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """Topology declared by one worker keeps events queued for the next; workers share the load."""
    settings = make_settings(exchange_name, [endpoint("q", receiver.url("/q"), ["w.*"])])
    first = await run_worker(settings)
    await run_worker.stop(first)  # finished, not merely unready: its consumer is gone
    ids = [await publish(exchange_name, "w.x", {"i": i}) for i in range(20)]
    assert await broker.depth(endpoint_queue(exchange_name, "q")) == 20
    await run_worker(settings)
    await run_worker(settings)
    await receiver.wait_for(lambda: len(receiver.requests) == 20)
    assert sorted(r.headers["webhook-id"] for r in receiver.requests) == sorted(ids)


@pytest.mark.parametrize("outage", ["longer_than_schedule", "recovers_mid_schedule", "flapping"])
async def test_endpoint_outages(
    outage: str, exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """An endpoint down past every retry ends with each event dead-lettered once; one that
    recovers, or flaps, gets every event delivered exactly once."""
    settings = make_settings(
        exchange_name,
        [endpoint("ep", receiver.url("/ep"), ["out.*"])],
        retry={"delays_s": [0.3, 0.6, 1.2]},
    )
    started = time.monotonic()
    flips = itertools.count()
    deciders = {
        "longer_than_schedule": lambda _id, _n: 503,
        "recovers_mid_schedule": lambda _id, _n: 503 if time.monotonic() - started < 1.0 else 200,
        # Up and down on alternate requests; no event is unlucky more than twice running.
        "flapping": lambda _id, n: 500 if next(flips) % 2 == 0 and n < 2 else 204,
    }
    receiver.deciders["/ep"] = deciders[outage]
    await run_worker(settings)
    ids = await publish_events(exchange_name, 200, "out.tick", outage)
    queue = dead_letter_queue(exchange_name)
    if outage == "longer_than_schedule":
        await eventually(lambda: _has_messages(broker, queue, 200), timeout_s=30)
        await asyncio.sleep(0.5)
        letters = await broker.drain(queue)
        dead = [json.loads(m.body)["id"] for m in letters]
        assert sorted(dead) == sorted(ids)
        assert {m.headers["hookline-attempts"] for m in letters} == {4}
        delivered: list[str] = []
    else:
        await receiver.wait_for(lambda: set(receiver.delivered_ids("/ep")) >= set(ids))
        await asyncio.sleep(0.5)
        delivered = receiver.delivered_ids("/ep")
        dead = []
        assert sorted(delivered) == sorted(ids)  # each exactly once
        assert await broker.depth(queue) == 0
    lost = set(ids) - set(delivered) - set(dead)
    print(
        f"\nRELIABILITY endpoint {outage}: published={len(ids)}, "
        f"delivered={len(set(delivered))}, duplicated={len(delivered) - len(set(delivered))}, "
        f"dead_lettered={len(dead)}, lost={len(lost)}, attempts={len(receiver.requests)}"
    )


# Ids a receiver cannot verify (surrounding whitespace) next to good ones; the index
# appended keeps them unique, so deliveries can be counted per message.
hostile_id_parts = st.sampled_from(["", " ", "\t", "evt", "x y", "\u00e9", "a" * 240])
hostile_bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    st.integers(min_value=1, max_value=30_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(min_value=60_000, max_value=90_000).map(lambda size: b'"' + b"x" * size + b'"'),
    st.sampled_from([b'{"id": "a", "id": "b"}', b'{"n": 1e400}', b'{"n": -1e999}']),
)
hostile_envelope_parts = st.fixed_dictionaries(
    {
        "prefix": hostile_id_parts,
        "suffix": hostile_id_parts,
        "routing_key": st.sampled_from(["hostile.x", "hostile.y"]),
        "timestamp": st.sampled_from(
            [
                "2026-01-01T00:00:00Z",
                "2026-01-01t00:00:00.123456789+01:00",
                "2026-W01-1T00:00:00Z",
                "20260101T000000Z",
                "2026-01-01",
                "9999-12-31T23:59:59-23:59",
            ]
        ),
        "data": st.dictionaries(st.text(max_size=10), st.text(max_size=200), max_size=4),
    }
)
hostile_properties = st.fixed_dictionaries(
    {},
    optional={
        "content_type": st.text(max_size=30),
        "message_id": st.text(max_size=60),
        "correlation_id": st.text(max_size=60),
        "app_id": st.text(max_size=30),
        "message_type": st.text(max_size=30),
        "priority": st.integers(min_value=0, max_value=255),
        "timestamp": st.datetimes(
            min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
        ),
    },
)
hostile_headers = st.dictionaries(
    st.one_of(
        st.text(min_size=1, max_size=30),
        st.sampled_from(["hookline-attempts", "hookline-handler-errors", "x-death", "hookline-x"]),
    ),
    publishable_header_values(),
    max_size=5,
)
raw_tricks = st.fixed_dictionaries(
    {
        "invalid_utf8_in": st.frozensets(
            st.sampled_from(["content_type", "message_id", "header_name"])
        ),
        "unrepresentable_timestamp": st.booleans(),
    }
)
retry_after_values = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(
        [
            "Fri, 31 Dec 99999 23:59:59 GMT",
            "Mon, 01 Jan 0001 00:00:00 GMT",
            "Tue, 01 Jan 2999 00:00:00 GMT",
            "\u0663\u0660",
            "1e309",
            "NaN",
            "-5",
            " 7 ",
        ]
    ),
)
hostile_answers = st.tuples(
    st.sampled_from([200, 204, 299, 300, 302, 400, 404, 410, 429, 500, 503, 599]),
    st.dictionaries(
        st.sampled_from(["Retry-After", "Location", "X-Junk"]), retry_after_values, max_size=3
    ),
    st.binary(max_size=2000),
)


async def test_hostile_messages_never_crash_or_wedge_the_worker(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """Property test over everything a publisher and an endpoint control: bodies, envelope
    fields, headers (64-bit doubles, strings that are not UTF-8, junk attempt counts),
    properties (including ones the AMQP client cannot decode) and HTTP answers (statuses,
    Retry-After dates out of range, bodies). Each message ends delivered, dead-lettered or
    still queued; the worker never crashes on one, never loses its broker connection, stays
    ready and keeps delivering."""
    cases: list[tuple[bytes, str, dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    answers: list[tuple[int, dict[str, str], bytes]] = []

    @hypothesis.settings(max_examples=150, database=None, deadline=None)
    @hypothesis.given(
        st.one_of(hostile_bodies, hostile_envelope_parts),
        hostile_properties,
        hostile_headers,
        raw_tricks,
        hostile_answers,
    )
    def collect(
        body: bytes | dict[str, Any],
        properties: dict[str, Any],
        headers: dict[str, Any],
        tricks: dict[str, Any],
        answer: tuple[int, dict[str, str], bytes],
    ) -> None:
        index = len(cases)
        routing_key = "hostile.x"
        if isinstance(body, dict):
            routing_key = body["routing_key"]
            document = {
                "id": f"{body['prefix']}{index}{body['suffix']}",
                "type": "hostile.x",
                "timestamp": body["timestamp"],
                "data": body["data"],
            }
            body = json.dumps(document).encode()
        cases.append((body, routing_key, properties, headers, tricks))
        answers.append(answer)

    collect()

    def answer(webhook_id: str, earlier: int) -> tuple[int, dict[str, str], bytes]:
        index = _case_index(webhook_id)
        return answers[index] if 0 <= index < len(answers) else (200, {}, b"")

    receiver.answers["/ep"] = answer
    settings = make_settings(
        exchange_name,
        [endpoint("ep", receiver.url("/ep"), ["hostile.#"])],
        delivery={"max_body_bytes": 65_536},
        retry={"delays_s": [0.1]},
        circuit_breaker={
            "enabled": True,
            "failure_threshold": 5,
            "cooldown_s": 0.2,
            "max_cooldown_s": 0.4,
        },
    )
    queues = [
        dead_letter_queue(exchange_name),
        endpoint_queue(exchange_name, "ep"),
        delay_queue(exchange_name, 0.1),
    ]

    async def accounted() -> int:
        delivered = {_case_index(i) for i in receiver.delivered_ids("/ep")} - {-1}
        return len(delivered) + sum([await broker.depth(queue) for queue in queues])

    with capture_logs() as logs:
        worker = await run_worker(settings)
        for body, routing_key, properties, headers, tricks in cases:
            await publish_raw(
                "127.0.0.1",
                5672,
                exchange_name,
                routing_key,
                body,
                headers=headers,
                **tricks,
                **properties,
            )
        await _settled(accounted, len(cases), timeout_s=90)
        assert worker.is_ready()
        await publish(exchange_name, "hostile.after", {"still": "alive"}, event_id="survivor")
        await receiver.wait_for(lambda: "survivor" in receiver.delivered_ids("/ep"), 30)
        await run_worker.stop(worker)
    # Stopped: nothing moves between queues any more, so the accounts are exact.
    await _settled(accounted, len(cases), timeout_s=10)
    letters = await broker.drain(dead_letter_queue(exchange_name))
    reasons = {letter.headers["hookline-reason"] for letter in letters}
    assert reasons <= {"invalid_envelope", "attempts_exhausted", "no_retry_status"}
    events = {entry["event"] for entry in logs}
    assert not events & {"delivery_handler_crashed", "delivery_outcome_not_recorded"}
    assert "broker_connection_lost" not in events
    registry = worker.metrics.registry
    assert registry.get_sample_value("webhook_broker_reconnects_total") == 0
    delivered = {_case_index(i) for i in receiver.delivered_ids("/ep")} - {-1}
    print(
        f"\nRELIABILITY hostile input: messages={len(cases)}, delivered={len(delivered)}, "
        f"dead_lettered={len(letters)}, queued={len(cases) - len(delivered) - len(letters)}, "
        "lost=0"
    )


def _case_index(webhook_id: str) -> int:
    """The case number embedded in a generated envelope id."""
    digits = "".join(c for c in webhook_id if c.isdigit())
    return int(digits) if digits else -1


async def _settled(count: Callable[[], Awaitable[int]], expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (found := await count()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{found} of {expected} messages accounted for")
        await asyncio.sleep(0.2)


async def test_a_crash_while_handling_ends_as_handler_error_not_a_loop(
    exchange_name: str, broker: Broker
) -> None:
    """A defect that raises inside the delivery path counts as a failed attempt: the event
    goes round the retry schedule and is dead-lettered with reason handler_error after
    three crashes, instead of being requeued for ever."""
    settings = make_settings(
        exchange_name,
        [endpoint("buggy", "http://buggy.test/hook", ["bug.#"])],
        retry={"delays_s": [0.05] * 5},
        security={"allow_private_networks": False},
    )
    await broker.declare(settings)
    connection = await connect(settings.broker, "hookline-test crash")
    client = EndpointClient(settings, settings.endpoints[0], resolver=FailingResolver())
    try:
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        consumer = EndpointConsumer(
            settings=settings,
            endpoint=settings.endpoints[0],
            channel=ConsumeChannel(await connection.channel(), dedicated=True, prefetch=32),
            probe=Probe(publish_channel),
            client=client,
            recorder=Recorder(
                exchange_name,
                publish_channel.default_exchange,
                5,
                delays=await publish_channel.get_exchange(delay_exchange(exchange_name)),
            ),
            metrics=Metrics(),
            operational_events=OperationalEvents(
                await declare_exchange(publish_channel, exchange_name), 5, enabled=False
            ),
        )
        with capture_logs() as logs:
            await consumer.start()
            await publish(exchange_name, "bug.found", {"n": 1}, event_id="crashy")
            queue = dead_letter_queue(exchange_name)
            await eventually(lambda: _has_messages(broker, queue, 1))
            await consumer.stop_consuming()
        [letter] = await broker.drain(queue)
        assert letter.headers["hookline-reason"] == "handler_error"
        assert letter.headers["hookline-handler-errors"] == 3
        assert letter.headers["hookline-attempts"] == 3
        assert letter.headers["hookline-last-status"] == "handler_error"
        crashes = [entry for entry in logs if entry["event"] == "delivery_handler_crashed"]
        assert len(crashes) == 3
        assert {entry["error"] for entry in crashes} == {"RuntimeError"}
    finally:
        await client.close()
        await connection.close()
        await broker.delete_all(settings)


async def test_a_type_that_differs_from_its_routing_key_is_invalid(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """An envelope published under another type's routing key would reach endpoints that
    never subscribed to its type: it is dead-lettered as invalid_envelope, never POSTed."""
    settings = make_settings(
        exchange_name, [endpoint("orders", receiver.url("/orders"), ["order.*"])]
    )
    await run_worker(settings)
    _, body = build_body("user.deleted", {"user": 1}, event_id="smuggled")
    await broker.publish(exchange_name, "order.created", body)
    queue = dead_letter_queue(exchange_name)
    await eventually(lambda: _has_messages(broker, queue, 1))
    [letter] = await broker.drain(queue)
    assert letter.headers["hookline-reason"] == "invalid_envelope"
    assert "routing key" in letter.headers["hookline-detail"]
    assert receiver.requests == []


async def test_undecodable_properties_do_not_disturb_the_connection(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """Properties the AMQP client cannot decode (not UTF-8, a timestamp past year 9999)
    used to close the worker's whole consume connection on every redelivery. Now each such
    message is delivered like any other, its copies carry what can be re-encoded, and the
    connection never drops."""
    receiver.script("/ep", 500, 200)
    settings = make_settings(
        exchange_name,
        [endpoint("ep", receiver.url("/ep"), ["odd.#"])],
        retry={"delays_s": [0.05]},
    )
    worker = await run_worker(settings)
    tricks: list[dict[str, Any]] = [
        {"invalid_utf8_in": frozenset({"content_type"})},
        {"invalid_utf8_in": frozenset({"message_id"})},
        {"invalid_utf8_in": frozenset({"header_name"})},
        {"unrepresentable_timestamp": True},
    ]
    for index, trick in enumerate(tricks):
        _, body = build_body("odd.props", {}, event_id=f"odd-{index}")
        await publish_raw("127.0.0.1", 5672, exchange_name, "odd.props", body, **trick)
    await receiver.wait_for(
        lambda: sorted(receiver.delivered_ids("/ep")) == [f"odd-{i}" for i in range(4)]
    )
    assert worker.is_ready()
    assert worker.metrics.registry.get_sample_value("webhook_broker_reconnects_total") == 0
    assert await broker.depth(dead_letter_queue(exchange_name)) == 0


async def test_headers_that_cannot_be_re_encoded_are_named_not_fatal(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """A 64-bit float header (the AMQP client re-encodes floats as 32 bits and fails for
    this one) used to crash every retry of its message. The retry and dead-letter copies
    now leave it out and say so; the rest of the headers travel."""
    receiver.script("/down", 503)
    settings = make_settings(
        exchange_name,
        [endpoint("down", receiver.url("/down"), ["wide.#"])],
        retry={"delays_s": [0.05]},
    )
    await run_worker(settings)
    _, body = build_body("wide.float", {}, event_id="wide-1")
    await publish_raw(
        "127.0.0.1",
        5672,
        exchange_name,
        "wide.float",
        body,
        headers={"precise": Double(1e300), "trace-id": "abc"},
    )
    queue = dead_letter_queue(exchange_name)
    await eventually(lambda: _has_messages(broker, queue, 1))
    [letter] = await broker.drain(queue)
    assert letter.body == body
    assert letter.headers["hookline-reason"] == "attempts_exhausted"
    assert letter.headers["trace-id"] == "abc"
    assert "precise" not in letter.headers
    assert letter.headers["hookline-dropped-headers"] == "precise"
    assert "precise" in letter.headers["hookline-detail"]
    assert len(receiver.requests) == 2


async def test_end_to_end_latency_counts_from_the_first_publish(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """webhook_end_to_end_seconds starts at the first publish (the SDK's
    hookline-published-at), not at the envelope's timestamp, which a backfilled event sets
    hours back; for another publisher's event it starts at the first attempt, retries
    included."""
    receiver.script("/other", 503, 200)
    settings = make_settings(
        exchange_name,
        [
            endpoint("sdk", receiver.url("/sdk"), ["sdk.#"], metrics_detail=True),
            endpoint("other", receiver.url("/other"), ["other.#"], metrics_detail=True),
        ],
        retry={"delays_s": [0.5]},
    )
    worker = await run_worker(settings)
    three_hours_ago = datetime.now(UTC) - timedelta(hours=3)
    await publish(exchange_name, "sdk.backfill", {}, timestamp=three_hours_ago)
    _, body = build_body("other.event", {}, event_id="other-1")
    await broker.publish(exchange_name, "other.event", body)
    await receiver.wait_for(lambda: receiver.delivered_ids("/other") == ["other-1"])
    await receiver.wait_for(lambda: len(receiver.delivered_ids("/sdk")) == 1)
    registry = worker.metrics.registry

    def observed(name: str) -> tuple[float | None, float | None]:
        labels = {"endpoint": name}
        return (
            registry.get_sample_value("webhook_end_to_end_seconds_count", labels),
            registry.get_sample_value("webhook_end_to_end_seconds_sum", labels),
        )

    await eventually(as_async(lambda: observed("other")[0] == 1))
    count, total = observed("sdk")
    assert count == 1 and total is not None and total < 60
    count, total = observed("other")
    assert count == 1 and total is not None and 0.5 <= total < 30


async def test_headers_decoded_with_loss_are_named_not_copied_changed(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """A header whose name is not UTF-8, or whose timestamp no datetime can hold, is
    decoded without closing the connection, and left out of copies with its name in
    hookline-dropped-headers: never carried renamed or emptied."""
    receiver.script("/down", 503)
    settings = make_settings(
        exchange_name,
        [endpoint("down", receiver.url("/down"), ["lossy.#"])],
        retry={"delays_s": [0.05]},
    )
    await run_worker(settings)
    _, body = build_body("lossy.headers", {}, event_id="lossy-1")
    await publish_raw(
        "127.0.0.1",
        5672,
        exchange_name,
        "lossy.headers",
        body,
        invalid_utf8_in=frozenset({"header_name"}),
        headers={"when": MARKER_TIME, "kept": "yes"},
    )
    queue = dead_letter_queue(exchange_name)
    await eventually(lambda: _has_messages(broker, queue, 1))
    [letter] = await broker.drain(queue)
    assert letter.headers["kept"] == "yes"
    assert "when" not in letter.headers
    assert not [name for name in letter.headers if "\ufffd" in name]
    dropped = letter.headers["hookline-dropped-headers"].split(",")
    assert "when" in dropped and len(dropped) == 2
    assert all(name.isascii() for name in dropped)


async def test_a_retry_never_carries_extra_routing_keys_to_another_endpoint(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A publisher's CC header names extra routing keys. Copied onto a retry, it would
    route the retry, when it leaves its delay tier through the retry exchange, into every
    endpoint queue it names as well: the retry copy leaves it out."""
    receiver.script("/a", 503, 200)
    settings = make_settings(
        exchange_name,
        [endpoint("a", receiver.url("/a"), ["a.#"]), endpoint("b", receiver.url("/b"), ["b.#"])],
        retry={"delays_s": [0.2]},
    )
    await run_worker(settings)
    connection = await connect(settings.broker, "hookline-test cc")
    try:
        channel = await connection.channel(on_return_raises=True)
        exchange = await channel.get_exchange(exchange_name)
        _, body = build_body("a.event", {}, event_id="evt_cc")
        await exchange.publish(
            aio_pika.Message(
                body,
                message_id="evt_cc",
                headers={"CC": [endpoint_queue(exchange_name, "b")]},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            "a.event",
        )
    finally:
        await connection.close()
    await receiver.wait_for(lambda: receiver.delivered_ids("/a") == ["evt_cc"])
    await asyncio.sleep(0.5)
    assert receiver.on("/b") == []


async def test_a_paused_endpoint_keeps_its_events_queued_and_the_worker_ready(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """An endpoint with ``paused: true`` has its queue declared and bound, so its events
    queue up, but no consumer on it: nothing is POSTed, while the worker is ready and its
    other endpoints deliver. A stop leaves the events queued."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("held", receiver.url("/held"), ["held.#"], paused=True),
            endpoint("live", receiver.url("/live"), ["live.#"]),
        ],
    )
    worker = await run_worker(settings)
    assert worker.is_ready()
    assert worker._endpoints is not None
    paused = {consumer.endpoint.name: consumer.paused for consumer in worker._endpoints.consumers}
    assert paused == {"held": True, "live": False}
    await publish_events(exchange_name, 4, "held.event", "held")
    await publish_events(exchange_name, 1, "live.event", "live")
    queue = endpoint_queue(exchange_name, "held")
    await broker.wait_depth(queue, 4)
    await receiver.wait_for(lambda: receiver.delivered_ids("/live") == ["live-0"])
    await asyncio.sleep(0.3)
    assert receiver.on("/held") == []
    assert worker.is_ready()
    consumed = await consumers_of(exchange_name)
    assert queue not in consumed
    assert endpoint_queue(exchange_name, "live") in consumed
    await run_worker.stop(worker)
    assert await broker.depth(queue) == 4
