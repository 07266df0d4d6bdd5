"""Helpers shared by several test modules that are not fixtures: hypothesis strategies for
what a hostile publisher can put in a message, broker policies, stranded retries."""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import json
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import strategies as st
from pamqp import body as pamqp_body
from pamqp import commands, encode, exceptions, frame, header

from producer import headers
from producer.envelope import build_body
from producer.headers import ATTEMPTS
from tests.conftest import (
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    make_document,
    publish_events,
)
from tests.faults import rabbitmqctl
from worker.metrics import Metrics
from worker.service import Worker
from worker.settings import RetrySettings, Settings, settings_from_document
from worker.topology import (
    dead_letter_queue,
    declare_all,
    delay_queue,
    legacy_delay_queue,
    legacy_delay_queue_arguments,
    record_delay_tiers,
)


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


class Double(float):
    """A header value sent as a 64-bit AMQP double (``d``), as Java or .NET clients send
    floats; pamqp only ever sends 32-bit ones."""


class NotUtf8(bytes):
    """A header long string (``S``) whose bytes are not UTF-8."""


def publishable_header_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Header values any AMQP client could publish, for :func:`publish_raw`."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        # RabbitMQ refuses non-finite floats (INTERNAL_ERROR), so none ever arrive.
        st.floats(width=32, allow_nan=False, allow_infinity=False),
        st.floats(allow_nan=False, allow_infinity=False).map(Double),
        st.decimals(min_value=-(10**6), max_value=10**6, places=3, allow_nan=False),
        st.text(max_size=30),
        st.binary(max_size=20).map(NotUtf8),
        st.builds(bytearray, st.binary(max_size=16)),
        st.datetimes(
            min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
        ),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=3),
        ),
        max_leaves=max_leaves,
    )


_PAMQP_ENCODE_TABLE_VALUE = encode.encode_table_value


def _encode_any_client(value: Any) -> bytes:
    if isinstance(value, Double):
        return b"d" + struct.pack(">d", value)
    if isinstance(value, NotUtf8):
        return b"S" + struct.pack(">I", len(value)) + bytes(value)
    return _PAMQP_ENCODE_TABLE_VALUE(value)


# Byte patterns a raw publish substitutes into the encoded content header, so that a
# message carries properties no AMQP client would encode (each is as long as its marker).
INVALID_UTF8 = b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc\xf8\xa1\xa1"
MARKER = b"HOOKLINE-MARKER!"
assert len(INVALID_UTF8) == len(MARKER)
# A timestamp no datetime can hold: pamqp reads values above 2**32 as milliseconds, and
# this is still far beyond the year 9999.
MARKER_TIME = datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)
UNREPRESENTABLE_TIME = struct.pack(">Q", 2**63 - 1)


async def publish_raw(
    url_host: str,
    url_port: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    invalid_utf8_in: frozenset[str] = frozenset(),
    unrepresentable_timestamp: bool = False,
    headers: dict[str, Any] | None = None,
    **plain_properties: Any,
) -> None:
    """Publish one message (with confirms) over a hand-built AMQP 0-9-1 connection, with
    what a buggy or hostile client in another language can send and aio-pika refuses to
    build: properties that are not valid UTF-8 (``content_type``, ``message_id``, a header
    name: ``header_name``), a timestamp beyond what a datetime holds, 64-bit double and
    non-UTF-8 string header values (:class:`Double`, :class:`NotUtf8`).

    Speaks just enough of the protocol, with pamqp's frame encoder, and the broker's
    default guest account."""
    properties: dict[str, Any] = {
        "delivery_mode": 2,
        **plain_properties,
        "headers": dict(headers or {}),
    }
    if "content_type" in invalid_utf8_in:
        properties["content_type"] = MARKER.decode()
    if "message_id" in invalid_utf8_in:
        properties["message_id"] = MARKER.decode()
    if "header_name" in invalid_utf8_in:
        properties["headers"][MARKER.decode()] = "value"
    if unrepresentable_timestamp:
        properties["timestamp"] = MARKER_TIME
    # pamqp's table encoder looks itself up at call time, so nested values go through the
    # wider encoder too; restored at once, and tests run on one thread.
    encode.encode_table_value = _encode_any_client
    try:
        content_header = frame.marshal(
            header.ContentHeader(0, len(body), commands.Basic.Properties(**properties)), 1
        )
    finally:
        encode.encode_table_value = _PAMQP_ENCODE_TABLE_VALUE
    content_header = content_header.replace(MARKER, INVALID_UTF8)
    content_header = content_header.replace(
        struct.pack(">Q", int(MARKER_TIME.timestamp())), UNREPRESENTABLE_TIME
    )
    reader, writer = await asyncio.open_connection(url_host, url_port)
    buffered = b""

    async def receive(expected: type[Any]) -> Any:
        nonlocal buffered
        while True:
            if buffered:
                try:
                    consumed, _, value = frame.unmarshal(buffered)
                except exceptions.UnmarshalingException:
                    consumed = 0
                if consumed:
                    buffered = buffered[consumed:]
                    if isinstance(value, expected):
                        return value
                    if isinstance(value, commands.Channel.Close | commands.Connection.Close):
                        raise ConnectionError(f"broker refused: {value.reply_text}")
                    continue
            chunk = await asyncio.wait_for(reader.read(65536), timeout=10)
            if not chunk:
                raise ConnectionError("broker closed the raw connection")
            buffered += chunk

    try:
        writer.write(header.ProtocolHeader().marshal())
        await receive(commands.Connection.Start)
        start_ok = commands.Connection.StartOk(
            client_properties={"connection_name": "hookline-test raw publisher"},
            mechanism="PLAIN",
            response="\0guest\0guest",
            locale="en_US",
        )
        writer.write(frame.marshal(start_ok, 0))
        tune = await receive(commands.Connection.Tune)
        tune_ok = commands.Connection.TuneOk(
            channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0
        )
        writer.write(frame.marshal(tune_ok, 0))
        writer.write(frame.marshal(commands.Connection.Open(virtual_host="/"), 0))
        await receive(commands.Connection.OpenOk)
        writer.write(frame.marshal(commands.Channel.Open(), 1))
        await receive(commands.Channel.OpenOk)
        writer.write(frame.marshal(commands.Confirm.Select(), 1))
        await receive(commands.Confirm.SelectOk)
        # No body frame for an empty body; a large one in frames of at most frame_max.
        chunk_size = tune.frame_max - 8
        body_frames = b"".join(
            frame.marshal(pamqp_body.ContentBody(body[at : at + chunk_size]), 1)
            for at in range(0, len(body), chunk_size)
        )
        publish = commands.Basic.Publish(exchange=exchange, routing_key=routing_key)
        writer.write(frame.marshal(publish, 1) + content_header + body_frames)
        await receive(commands.Basic.Ack)
        writer.write(
            frame.marshal(
                commands.Connection.Close(
                    reply_code=200, reply_text="done", class_id=0, method_id=0
                ),
                0,
            )
        )
        await receive(commands.Connection.CloseOk)
    finally:
        writer.close()


class FailingResolver(AbstractResolver):
    """A resolver with a bug: it raises what no HTTP client error handling expects. Stands
    in for any defect inside the worker's delivery path."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        raise RuntimeError("resolver bug")

    async def close(self) -> None:
        return None


# Publisher-controlled text that acts on a terminal if printed as it is: clear screen (ESC
# CSI), a C1 CSI, a right-to-left override, and rich markup.
TERMINAL_ATTACK = "\x1b[2J\x9b\u202e[bold red]"
# Raw characters that must never reach an operator's terminal (newline aside, which
# separates lines): C0, DEL, C1, bidi and other invisible format characters, separators,
# lone surrogates.
RAW_UNSAFE_RE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)


def assert_terminal_safe(output: str) -> None:
    """Fail if ``output`` holds a raw control, format or separator character."""
    found = RAW_UNSAFE_RE.search(output)
    assert found is None, f"raw {found.group()!r} at {found.start()} of {output!r}"


async def put_raw_dead_letter(
    channel: AbstractChannel,
    exchange: str,
    body: bytes,
    headers: dict[str, Any],
    message_id: str | None = None,
) -> None:
    """A message published straight into ``<exchange>.dead-letter``, as a hostile (or merely
    unusual) publisher could: any body, any header values of any AMQP type."""
    await channel.default_exchange.publish(
        aio_pika.Message(
            body,
            headers=headers,
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        dead_letter_queue(exchange),
    )


async def dead_letter_event(
    broker: Broker, exchange: str, endpoint: str, event_id: str, event_type: str = "order.created"
) -> None:
    """An event of ``endpoint`` in the dead-letter queue, dead-lettered now after its
    attempts ran out, as a worker would leave it."""
    channel = await broker.channel()
    try:
        _, body = build_body(event_type, {"id": event_id}, event_id=event_id)
        await put_raw_dead_letter(
            channel,
            exchange,
            body,
            {
                headers.ENDPOINT: endpoint,
                headers.REASON: "max_attempts",
                headers.DEAD_LETTERED_AT: datetime.now(UTC).isoformat(),
            },
        )
    finally:
        await channel.close()


class RecordingResolver(AbstractResolver):
    """A DNS server answering every name with the same addresses, noting each name asked:
    a hostile DNS record, and a witness of which host spelling was looked up."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.names: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.names.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        return None


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
    await broker.wait_depth(delay_queue(exchange, 60), count, timeout_s=15)
    await run_worker.stop(worker)
    await run_worker.stop(await run_worker(settings_from_document(after, Path("after.yaml"), {})))
    return before, after


async def strand_in_legacy_tier(
    broker: Broker, settings: Settings, endpoint_name: str, delay_s: float, count: int
) -> str:
    """``count`` events (message ids ``stranded-<n>``) waiting for ``endpoint_name`` in a
    per-endpoint delay queue of ``delay_s`` as Hookline before 0.2 declared them, with the
    tier recorded in the exchange's manifest; returns that queue's name."""
    channel = await broker.channel()
    try:
        await declare_all(channel, settings)
        await record_delay_tiers(
            channel, settings.model_copy(update={"retry": RetrySettings(delays_s=(delay_s,))})
        )
        name = legacy_delay_queue(settings.broker.exchange, endpoint_name, delay_s)
        await channel.declare_queue(
            name,
            durable=True,
            arguments=legacy_delay_queue_arguments(settings, endpoint_name, delay_s),
        )
        for n in range(count):
            event = {"id": f"evt_stranded_{n}", "type": f"{endpoint_name}.event", "data": {}}
            body = json.dumps({**event, "timestamp": "2026-01-01T00:00:00Z"})
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body.encode(),
                    message_id=f"stranded-{n}",
                    headers={ATTEMPTS: 1},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                name,
            )
    finally:
        await channel.close()
    await broker.wait_depth(name, count)
    return name


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


def as_async(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A plain predicate for ``conftest.eventually``, which awaits its condition."""

    async def check() -> bool:
        return predicate()

    return check


def reloading_worker(first: dict[str, Any], *later: dict[str, Any]) -> Worker:
    """A worker started from the config document ``first`` whose reloads read the documents
    ``later``, one per reload."""
    documents = iter(later)
    return Worker(
        settings_from_document(first, Path("x.yaml"), {}),
        Metrics(),
        load_settings=lambda: settings_from_document(next(documents), Path("x.yaml"), {}),
    )


async def is_ready(worker: Worker) -> bool:
    return worker.is_ready()


async def was_logged(logs: list[dict[str, object]], event: str, count: int = 1) -> bool:
    return sum(entry["event"] == event for entry in logs) >= count


async def consumers_of(exchange: str) -> dict[str, tuple[str, int]]:
    """Queue -> (channel pid, prefetch) of every consumer on ``exchange``'s queues, as the
    broker reports them."""
    out = await rabbitmqctl("list_consumers", "queue_name", "channel_pid", "prefetch_count")
    found = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].startswith(f"{exchange}."):
            found[parts[0]] = (parts[1], int(parts[2]))
    return found
