"""Queue names and declarations; every name starts with ``<exchange>.``.

- ``<exchange>``: topic exchange producers publish to.
- ``<exchange>.endpoint.<name>``: one work queue per endpoint, bound with its patterns,
  so a slow endpoint only ever delays its own queue. Its dead-letter exchange sends a
  message the broker gives up on (over a delivery limit: RabbitMQ 4.x's default of 20, a
  policy, an argument) into ``<exchange>.dead-letter`` instead of dropping it.
- ``<exchange>.delay.<delay>``: one delay queue per delay, shared by every endpoint. A
  retry is published to the headers exchange ``<exchange>.delay`` with the endpoint's
  queue name as routing key and its tier in ``hookline-retry-delay``; it waits out the
  queue's TTL, then dead-letters, keeping that routing key, into the direct exchange
  ``<exchange>.retry``, where each endpoint queue is bound by its own name. No consumer
  ever reads a delay queue. A retry whose endpoint queue is no longer bound there (the
  endpoint was retired) goes through the retry exchange's alternate exchange
  ``<exchange>.retry.orphans`` into the dead-letter queue, where the tools read it as
  ``endpoint_removed``. So the queue count is one per endpoint plus a fixed few.
- ``<exchange>.endpoint.<name>.delay.<delay>``: the per-endpoint delay queues of Hookline
  before 0.2. Never declared any more; those that exist keep draining into their endpoint
  queue through the default exchange, and ``upgrade-queues`` moves what they hold into
  the shared tiers and deletes them.
- ``<exchange>.dead-letter``: where deliveries end when they cannot succeed.
- ``<exchange>.dead-letter.overflow``: where the dead-letter queue's own dead-lettering
  goes, should a delivery limit ever apply to it (a policy); every tool that opens the
  dead-letter queue first moves what is here back into it. It has no dead-letter exchange.
- ``<exchange>.delay-tiers``: the manifest of every delay tier ever declared for the
  exchange, so tools find delay queues of earlier ``retry.delays_s`` schedules too.
- ``<exchange>.unrouted``: a bounded queue of events that matched no endpoint and were not
  published through the SDK (which gets them returned instead); see ``producer.exchange``.

Retries are republished by the worker (with confirms), never routed round a loop by the
broker: RabbitMQ silently drops messages that dead-letter around a loop with no rejection
in it. The work queue's dead-letter exchange leads out of the loop, to the dead-letter
queue, which leads to the overflow queue, which leads nowhere.

Queues declared by Hookline 0.1.0 lack these dead-letter arguments, and arguments cannot
change on an existing queue. Such a queue is used as it is, with a ``queue_needs_upgrade``
warning, until ``python -m worker upgrade-queues`` recreates it (``worker.upgrade``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

from producer import headers
from producer.exchange import (
    capture_exchange,
    declare_exchange,
    returned_exchange,
    unrouted_exchange,
)
from worker.exceptions import NotConfirmed, TopologyConflict
from worker.retry import delay_tiers
from worker.settings import ENDPOINT_NAME_RE, EndpointSettings, Settings

T = TypeVar("T")
log = structlog.get_logger("hookline.topology")

UPGRADE_COMMAND = "python -m worker upgrade-queues --config <config file>"
# How long a second read of the delay-tier manifest waits for a concurrent merge.
MANIFEST_REREAD_S = 0.25
MANIFEST_PUBLISH_ATTEMPTS = 50
MANIFEST_RETRY_S = 0.1
DELAY_LABEL_RE = re.compile(r"[0-9]+m?s")
# Queues already reported as needing an upgrade: the warning is logged once per process.
_needs_upgrade_reported: set[str] = set()


def endpoint_queue(exchange: str, endpoint: str) -> str:
    return f"{exchange}.endpoint.{endpoint}"


def delay_label(delay_s: float) -> str:
    milliseconds = round(delay_s * 1000)
    if milliseconds % 1000 == 0:
        return f"{milliseconds // 1000}s"
    return f"{milliseconds}ms"


def delay_queue(exchange: str, delay_s: float) -> str:
    """The delay tier every endpoint's retries wait in. Named by delay, not attempt number:
    queue arguments are immutable, so a changed schedule gets new queues while the old
    ones keep draining."""
    return f"{exchange}.delay.{delay_label(delay_s)}"


def legacy_delay_queue(exchange: str, endpoint: str, delay_s: float) -> str:
    """A delay tier of one endpoint, as Hookline before 0.2 declared them; still drained."""
    return f"{endpoint_queue(exchange, endpoint)}.delay.{delay_label(delay_s)}"


def delay_exchange(exchange: str) -> str:
    """Headers exchange in front of the delay tiers: a retry is published here with the
    endpoint's queue as routing key, which it keeps when it dead-letters."""
    return f"{exchange}.delay"


def retry_exchange(exchange: str) -> str:
    """Direct exchange a retry dead-letters into from its tier; each endpoint queue is
    bound to it by its own name."""
    return f"{exchange}.retry"


def retry_orphans_exchange(exchange: str) -> str:
    """Alternate exchange of the retry exchange: a retry whose endpoint is gone (unbound)
    goes to the dead-letter queue through it instead of vanishing."""
    return f"{exchange}.retry.orphans"


def dead_letter_queue(exchange: str) -> str:
    return f"{exchange}.dead-letter"


def dead_letter_overflow_queue(exchange: str) -> str:
    return f"{dead_letter_queue(exchange)}.overflow"


def delay_tier_manifest_queue(exchange: str) -> str:
    return f"{exchange}.delay-tiers"


def unrouted_queue(exchange: str) -> str:
    return f"{exchange}.unrouted"


def endpoint_of_work_queue(queue: str, exchange: str | None = None) -> str | None:
    """The endpoint whose work queue ``queue`` is, or None for any other queue.

    Endpoint names have no dots, so ``<anything>.endpoint.<name>`` is a work queue and
    delay queues (``....delay.<d>``) are not; ``exchange``, when known, must match too.
    """
    prefix, marker, name = ["", "", "", *queue.rsplit(".", 2)][-3:]
    if not prefix or marker != "endpoint" or not ENDPOINT_NAME_RE.fullmatch(name):
        return None
    if exchange is not None and prefix != exchange:
        return None
    return name


def is_delay_queue(queue: str, exchange: str | None = None) -> bool:
    """``queue`` is a shared delay tier (``<exchange>.delay.<label>``)."""
    prefix, marker, label = ["", "", "", *queue.rsplit(".", 2)][-3:]
    if marker != "delay" or not DELAY_LABEL_RE.fullmatch(label):
        return False
    return prefix == exchange if exchange is not None else bool(prefix)


def exchange_names(exchange: str) -> list[str]:
    """Every exchange Hookline declares for ``exchange`` (for clean-up)."""
    return [
        exchange,
        unrouted_exchange(exchange),
        returned_exchange(exchange),
        capture_exchange(exchange),
        delay_exchange(exchange),
        retry_exchange(exchange),
        retry_orphans_exchange(exchange),
    ]


def queue_names(settings: Settings) -> list[str]:
    """Every queue the worker declares for ``settings`` (for tools and for clean-up)."""
    exchange = settings.broker.exchange
    names = [
        dead_letter_queue(exchange),
        dead_letter_overflow_queue(exchange),
        delay_tier_manifest_queue(exchange),
        unrouted_queue(exchange),
    ]
    names += [delay_queue(exchange, delay) for delay in delay_tiers(settings.retry)]
    names += [endpoint_queue(exchange, endpoint.name) for endpoint in settings.endpoints]
    return names


def _type_arguments(settings: Settings) -> dict[str, Any]:
    return {"x-queue-type": settings.broker.queue_type}


def _dead_lettering_into(settings: Settings, queue: str | None) -> dict[str, Any]:
    """Dead-lettering to ``queue`` through the default exchange, or with ``queue=None``
    to the retry exchange under the message's own routing key (a delay tier's)."""
    arguments: dict[str, Any] = (
        {"x-dead-letter-exchange": retry_exchange(settings.broker.exchange)}
        if queue is None
        else {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}
    )
    if settings.broker.queue_type == "quorum":
        # Quorum queues can dead-letter at-least-once (the message leaves only once the
        # target confirmed it, and waits while the target is missing); that needs
        # reject-publish overflow. Classic queues only dead-letter at-most-once.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


def work_queue_arguments(settings: Settings) -> dict[str, Any]:
    """An endpoint's work queue: what the broker gives up on goes to the dead-letter queue."""
    return {
        **_type_arguments(settings),
        **_dead_lettering_into(settings, dead_letter_queue(settings.broker.exchange)),
    }


def legacy_work_queue_arguments(settings: Settings) -> dict[str, Any]:
    """A work queue as Hookline 0.1.0 declared it: no dead-letter exchange."""
    return _type_arguments(settings)


def dead_letter_queue_arguments(settings: Settings) -> dict[str, Any]:
    """The dead-letter queue: what the broker gives up on goes to the overflow queue."""
    return {
        **_type_arguments(settings),
        **_dead_lettering_into(settings, dead_letter_overflow_queue(settings.broker.exchange)),
    }


def legacy_dead_letter_queue_arguments(settings: Settings) -> dict[str, Any]:
    """The dead-letter queue as Hookline 0.1.0 declared it: no dead-letter exchange."""
    return _type_arguments(settings)


def delay_queue_arguments(settings: Settings, delay_s: float) -> dict[str, Any]:
    """A shared delay tier: its TTL, then into the retry exchange under the routing key the
    retry was published with (its endpoint's queue)."""
    return {
        **_type_arguments(settings),
        "x-message-ttl": round(delay_s * 1000),
        **_dead_lettering_into(settings, None),
    }


def legacy_delay_queue_arguments(
    settings: Settings, endpoint: str, delay_s: float
) -> dict[str, Any]:
    """A per-endpoint delay queue as Hookline before 0.2 declared it: its TTL, then back to
    the endpoint's work queue through the default exchange."""
    return {
        **_type_arguments(settings),
        "x-message-ttl": round(delay_s * 1000),
        **_dead_lettering_into(settings, endpoint_queue(settings.broker.exchange, endpoint)),
    }


def delay_binding(delay_s: float) -> dict[str, Any]:
    """How a tier is bound to the delay exchange (and what a retry carries to reach it)."""
    return {"x-match": "all", headers.RETRY_DELAY: delay_label(delay_s)}


@asynccontextmanager
async def _side_channel(
    channel: AbstractChannel, *, confirms: bool = False
) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A short-lived channel on ``channel``'s connection, for operations that may close
    their channel (a refused declare) or must not share delivery tags with a consumer."""
    underlay = await channel.get_underlay_channel()
    side = await underlay.connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
    try:
        yield side
    finally:
        if not side.is_closed:
            await side.close()


async def accepts_arguments(channel: AbstractChannel, name: str, arguments: dict[str, Any]) -> bool:
    """Declare ``name`` durable with ``arguments`` on a throwaway channel: False if the
    queue exists with other arguments. Creates the queue if it does not exist."""
    try:
        async with _side_channel(channel) as side:
            await side.queue_declare(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed:
        return False
    return True


class Probe:
    """A few channels for declarations the broker may refuse.

    A refused declare (PRECONDITION_FAILED: the queue exists with other arguments) closes
    the channel it was sent on. Endpoint consumers share channels at scale, so a declare
    that may be refused is tried here first, where a refusal costs nothing but this
    channel. Each declare has a probe channel to itself while it runs: a refusal then
    answers that declare only, never one that merely shared the channel. A closed channel
    is replaced by a new one on its next use.
    """

    def __init__(self, anchor: AbstractChannel, size: int = 4) -> None:
        self._anchor = anchor  # a robust channel: its connection is the one to open on
        self._free: asyncio.Queue[aiormq.abc.AbstractChannel | None] = asyncio.Queue()
        for _ in range(size):
            self._free.put_nowait(None)
        self._all: list[aiormq.abc.AbstractChannel] = []

    async def accepts(self, name: str, arguments: dict[str, Any]) -> bool:
        """Declare ``name`` durable with ``arguments``: False if it exists with other
        arguments. Creates the queue if it does not exist."""
        channel = await self._free.get()
        try:
            if channel is None or channel.is_closed:
                underlay = await self._anchor.get_underlay_channel()
                channel = await underlay.connection.channel()
                self._all = [*(kept for kept in self._all if not kept.is_closed), channel]
            await channel.queue_declare(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed:
            return False
        finally:
            self._free.put_nowait(channel)
        return True

    async def close(self) -> None:
        opened, self._all = self._all, []
        for channel in opened:
            if not channel.is_closed:
                await channel.close()


async def _accepted_arguments(
    probe: Probe, name: str, arguments: dict[str, Any], legacy: dict[str, Any]
) -> dict[str, Any]:
    """``arguments``, or ``legacy`` if an earlier Hookline declared ``name`` with those
    (reported once per queue): a worker keeps running on such a queue until an operator
    upgrades it. Any other difference is a :class:`TopologyConflict`."""
    if await probe.accepts(name, arguments):
        return arguments
    if not await probe.accepts(name, legacy):
        raise TopologyConflict(
            f"{name} exists with other arguments (another broker.queue_type?). Delete it "
            "(management UI, or `rabbitmqadmin delete queue name=...`) once drained, or set "
            "another broker.exchange"
        )
    _report_needs_upgrade(name)
    return legacy


def _report_needs_upgrade(name: str) -> None:
    if name not in _needs_upgrade_reported:
        _needs_upgrade_reported.add(name)
        log.warning(
            "queue_needs_upgrade",
            queue=name,
            command=UPGRADE_COMMAND,
            hint="declared by an earlier Hookline without a dead-letter exchange: a "
            "message over a delivery limit would be dropped; stop the workers and run "
            "the command",
        )


async def _declare_upgradable(
    channel: AbstractChannel, name: str, arguments: dict[str, Any], legacy: dict[str, Any]
) -> AbstractQueue:
    """Declare ``name`` with ``arguments``, or as it is if an earlier Hookline declared it
    with ``legacy`` ones (reported once per queue): a worker keeps running on such a queue
    until an operator upgrades it."""
    if not await accepts_arguments(channel, name, arguments) and await accepts_arguments(
        channel, name, legacy
    ):
        _report_needs_upgrade(name)
        arguments = legacy
    # Any other difference (another queue type) fails here, and is reported as a conflict.
    return await channel.declare_queue(name, durable=True, arguments=arguments)


async def _translating_conflicts(coro: Awaitable[T]) -> T:
    try:
        return await coro
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyConflict(
            f"{exc.args[0] if exc.args else exc}. It was declared earlier with other arguments "
            "(another broker.queue_type, or by a Hookline before 0.1.0 without the unrouted "
            "alternate exchange). Delete it (management UI, or `rabbitmqadmin delete "
            "exchange|queue name=...`) once drained, or set another broker.exchange"
        ) from None


async def declare_unrouted_queue(channel: AbstractChannel, settings: Settings) -> AbstractQueue:
    """The bounded queue that keeps the newest events no endpoint subscribed to."""
    exchange = settings.broker.exchange

    async def declare() -> AbstractQueue:
        await declare_exchange(channel, exchange)
        queue = await channel.declare_queue(
            unrouted_queue(exchange),
            durable=True,
            arguments={
                **_type_arguments(settings),
                "x-max-length": settings.broker.unrouted_max_messages,
                "x-overflow": "drop-head",
            },
        )
        await queue.bind(capture_exchange(exchange))
        return queue

    return await _translating_conflicts(declare())


async def declare_dead_letter_queue(channel: AbstractChannel, settings: Settings) -> AbstractQueue:
    """The dead-letter queue, and before it the overflow queue it dead-letters into."""
    exchange = settings.broker.exchange

    async def declare() -> AbstractQueue:
        await declare_dead_letter_overflow_queue(channel, settings)
        return await _declare_upgradable(
            channel,
            dead_letter_queue(exchange),
            dead_letter_queue_arguments(settings),
            legacy_dead_letter_queue_arguments(settings),
        )

    return await _translating_conflicts(declare())


async def declare_dead_letter_overflow_queue(
    channel: AbstractChannel, settings: Settings
) -> AbstractQueue:
    # Terminal: no dead-letter exchange, so nothing can loop. It holds letters only until
    # the next tool opens the dead-letter queue and moves them back as fresh copies.
    return await _translating_conflicts(
        channel.declare_queue(
            dead_letter_overflow_queue(settings.broker.exchange),
            durable=True,
            arguments=_type_arguments(settings),
        )
    )


async def declare_retry_exchanges(channel: AbstractChannel, exchange: str) -> None:
    """The exchanges around the delay tiers: ``<exchange>.delay`` in, ``<exchange>.retry``
    out, and its alternate exchange ``<exchange>.retry.orphans``. Idempotent."""
    orphans = await channel.declare_exchange(
        retry_orphans_exchange(exchange), aio_pika.ExchangeType.FANOUT, durable=True
    )
    await channel.declare_exchange(
        retry_exchange(exchange),
        aio_pika.ExchangeType.DIRECT,
        durable=True,
        arguments={"alternate-exchange": orphans.name},
    )
    await channel.declare_exchange(
        delay_exchange(exchange), aio_pika.ExchangeType.HEADERS, durable=True
    )


async def declare_retry_tiers(channel: AbstractChannel, settings: Settings) -> None:
    """The shared delay tiers of ``retry.delays_s`` and the exchanges around them; the
    dead-letter queue must exist (orphaned retries go there). Idempotent."""
    exchange = settings.broker.exchange

    async def declare() -> None:
        # Orphans lead somewhere before any retry can become one.
        orphans = await channel.declare_exchange(
            retry_orphans_exchange(exchange), aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_letters = await channel.declare_queue(dead_letter_queue(exchange), passive=True)
        await dead_letters.bind(orphans)
        await declare_retry_exchanges(channel, exchange)
        for delay in delay_tiers(settings.retry):
            tier = await channel.declare_queue(
                delay_queue(exchange, delay),
                durable=True,
                arguments=delay_queue_arguments(settings, delay),
            )
            await tier.bind(delay_exchange(exchange), arguments=delay_binding(delay))

    await _translating_conflicts(declare())


async def declare_endpoint(
    channel: AbstractChannel,
    settings: Settings,
    endpoint: EndpointSettings,
    probe: Probe | None = None,
) -> AbstractQueue:
    """The endpoint's queue and its bindings, on ``channel`` (which a robust channel then
    restores after a reconnect). The exchanges must exist (:func:`declare_exchanges`).

    With a ``probe``, the queue's arguments are settled there first, so a refusal never
    closes ``channel``, which other endpoints' consumers may share. Idempotent.
    """
    name = endpoint_queue(settings.broker.exchange, endpoint.name)
    arguments = work_queue_arguments(settings)
    legacy = legacy_work_queue_arguments(settings)

    async def declare() -> AbstractQueue:
        if probe is None:
            queue = await _declare_upgradable(channel, name, arguments, legacy)
        else:
            accepted = await _accepted_arguments(probe, name, arguments, legacy)
            queue = await channel.declare_queue(name, durable=True, arguments=accepted)
        # By name: the exchanges were declared once for the worker, not per channel.
        for pattern in endpoint.events:
            await queue.bind(settings.broker.exchange, routing_key=pattern)
        await queue.bind(retry_exchange(settings.broker.exchange), routing_key=name)
        return queue

    return await _translating_conflicts(declare())


async def declare_exchanges(channel: AbstractChannel, settings: Settings) -> None:
    """The exchange producers publish to (with its unrouted chain), the dead-letter and
    unrouted queues, and the retry tiers: everything endpoints need first."""
    await declare_exchange(channel, settings.broker.exchange)
    await declare_dead_letter_queue(channel, settings)
    await declare_unrouted_queue(channel, settings)
    await declare_retry_tiers(channel, settings)


async def record_delay_tiers(channel: AbstractChannel, settings: Settings) -> tuple[float, ...]:
    """Add the configured delay tiers to the exchange's manifest; returns every recorded one.

    The manifest is a grow-only set kept in ``<exchange>.delay-tiers`` as JSON messages.
    Merging takes every message there, publishes their union with a confirm, and only then
    acks what it took. Concurrent merges are safe: union is commutative, and nothing is
    acked before a union containing it is confirmed, so at worst the queue briefly holds
    several messages, which the next merge folds into one.
    """
    return await _merge_delay_manifest(channel, settings, delay_tiers(settings.retry))


async def known_delay_tiers(
    connection: AbstractConnection, settings: Settings, *, reads: int = 1
) -> tuple[float, ...]:
    """Every delay tier recorded for the exchange plus the configured ones, ascending.

    While another process holds the manifest's messages (a few milliseconds while it
    merges), a read sees only part of it; ``reads`` > 1 reads again a moment later and
    takes the union, for callers that must not miss a tier (``dlq retire``).
    """
    channel = await connection.channel()
    try:
        known = set(delay_tiers(settings.retry))
        for read in range(reads):
            if read:
                await asyncio.sleep(MANIFEST_REREAD_S)
            known.update(await _merge_delay_manifest(channel, settings, ()))
    finally:
        await channel.close()
    return tuple(sorted(known))


async def _merge_delay_manifest(
    channel: AbstractChannel, settings: Settings, adding: Iterable[float]
) -> tuple[float, ...]:
    name = delay_tier_manifest_queue(settings.broker.exchange)
    added = {round(delay * 1000) for delay in adding}  # as delay_label rounds them
    recorded = set(added)
    async with _side_channel(channel, confirms=True) as side:
        if added:
            await _translating_conflicts(
                side.queue_declare(name, durable=True, arguments=_type_arguments(settings))
            )
        else:
            try:  # a reader creates nothing
                await side.queue_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return ()
        # Publish first, and read only once the broker confirmed: a quorum queue that another
        # client created a moment ago may not be running yet, and a basic.get then fails
        # with INTERNAL_ERROR (noproc), which closes the whole connection (the worker's),
        # whereas a publish is merely nacked. Our own message is taken back with the rest.
        await _publish_manifest(side, name, added, settings)
        last_tag: int | None = None
        while (taken := await side.basic_get(name, no_ack=False)).delivery_tag is not None:
            last_tag = taken.delivery_tag
            recorded |= _manifest_delays_ms(taken.body)
        # Always republished, even unchanged: returning a message (by closing the channel)
        # would count as a delivery against a quorum queue's delivery limit.
        if recorded:
            await _publish_manifest(side, name, recorded, settings)
        if last_tag is not None:
            await side.basic_ack(last_tag, multiple=True)
    return tuple(sorted(milliseconds / 1000 for milliseconds in recorded))


async def _publish_manifest(
    side: aiormq.abc.AbstractChannel, name: str, delays_ms: set[int], settings: Settings
) -> None:
    """Publish one manifest message and wait for the confirm, retrying while the broker
    nacks it (a queue still starting)."""
    body = json.dumps({"delays_ms": sorted(delays_ms)}).encode()
    properties = aiormq.spec.Basic.Properties(delivery_mode=2, content_type="application/json")
    for attempt in range(1, MANIFEST_PUBLISH_ATTEMPTS + 1):
        try:
            await side.basic_publish(
                body,
                routing_key=name,
                properties=properties,
                mandatory=True,
                timeout=settings.broker.publish_timeout_s,
            )
            return
        except aiormq.exceptions.DeliveryError:
            if attempt == MANIFEST_PUBLISH_ATTEMPTS:
                raise NotConfirmed(f"the broker refused the delay-tier manifest {name}") from None
            await asyncio.sleep(MANIFEST_RETRY_S)


def _manifest_delays_ms(body: bytes) -> set[int]:
    """Delays in one manifest message; anything malformed contributes nothing."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return set()
    delays = document.get("delays_ms") if isinstance(document, dict) else None
    if not isinstance(delays, list):
        return set()
    return {value for value in delays if type(value) is int and value > 0}


async def declare_all(channel: AbstractChannel, settings: Settings) -> None:
    """Everything the worker needs, for tools that run without a worker."""
    await declare_exchanges(channel, settings)
    await record_delay_tiers(channel, settings)
    for endpoint in settings.endpoints:
        await declare_endpoint(channel, settings, endpoint)


async def unbind_patterns(queue: AbstractQueue, exchange: str, patterns: Iterable[str]) -> None:
    """Through the queue object that bound them, so a robust channel forgets them too."""
    for pattern in patterns:
        await queue.unbind(exchange, routing_key=pattern)


async def _plain_channel(connection: AbstractConnection) -> aiormq.abc.AbstractChannel:
    """A channel the robust layer does not know of. A passive declare of a missing queue
    closes its channel; a robust one would reopen itself and, looking open, stay behind
    after every such call."""
    transport = connection.transport
    if transport is None:
        raise RuntimeError("the broker connection is not open")
    return await transport.connection.channel()


async def inspect_queue(connection: AbstractConnection, name: str) -> tuple[int, int] | None:
    """(messages ready, consumers) of an existing queue, or None if there is none."""
    return (await inspect_queues(connection, [name]))[name]


async def inspect_queues(
    connection: AbstractConnection, names: Iterable[str]
) -> dict[str, tuple[int, int] | None]:
    """(messages ready, consumers) of each queue that exists (None for one that does
    not), on one channel while they exist."""
    found: dict[str, tuple[int, int] | None] = {}
    channel: aiormq.abc.AbstractChannel | None = None
    try:
        for name in names:
            if channel is None or channel.is_closed:
                channel = await _plain_channel(connection)
            try:
                declared = await channel.queue_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                found[name] = None  # and the broker closed the channel
                continue
            found[name] = int(declared.message_count or 0), int(declared.consumer_count or 0)
    finally:
        if channel is not None and not channel.is_closed:
            await channel.close()
    return found


def endpoint_queue_names(settings: Settings, endpoint: str, delays: Iterable[float]) -> list[str]:
    """An endpoint's legacy delay queues for ``delays``, then its work queue (the order to
    empty them in: legacy delay queues expire into the work queue)."""
    exchange = settings.broker.exchange
    names = [legacy_delay_queue(exchange, endpoint, delay) for delay in sorted(set(delays))]
    return [*names, endpoint_queue(exchange, endpoint)]


async def count_waiting(connection: AbstractConnection, settings: Settings, endpoint: str) -> int:
    """Messages ready for ``endpoint`` in its work queue and in any legacy delay queue of
    every delay tier ever recorded (for the ``endpoint_removed`` log line). Its retries in
    the shared tiers are not counted: they are not told apart without reading them."""
    tiers = await known_delay_tiers(connection, settings)
    found = await inspect_queues(connection, endpoint_queue_names(settings, endpoint, tiers))
    return sum(ready for ready, _ in filter(None, found.values()))
