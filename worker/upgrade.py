"""``python -m worker upgrade-queues``: recreate queues an earlier Hookline declared with
other arguments, keeping every message.

Hookline 0.1.0 declared endpoint work queues and the dead-letter queue without a
dead-letter exchange, so a message over a delivery limit was dropped. Queue arguments
cannot change on an existing queue, so each such queue is recreated:

- an endpoint's work queue: a holding queue ``<queue>.upgrading`` is bound to the same
  patterns *before* the old queue is unbound, so every event published meanwhile reaches
  one of them (or both: a duplicate, never a gap). The old queue's messages are moved into
  the holding queue, the old queue is deleted and declared anew with its bindings, and the
  holding queue is unbound, moved back and deleted;
- the dead-letter queue: its messages are moved into ``<queue>.upgrading``, it is deleted
  and declared anew, and they are moved back. Only workers and the tools publish to it.

Hookline before 0.2 gave every endpoint its own delay queues
(``<exchange>.endpoint.<name>.delay.<d>``); 0.2 shares one per delay. Old ones keep
draining into their endpoint's queue by themselves, so workers of 0.2 lose nothing without
this command; it only removes them early: their retries are moved into the shared tier of
the same delay (where they wait that delay again) or, for a delay the current schedule no
longer has, straight into the endpoint's queue; then the old queue is deleted.

Every move is a confirmed publish of a copy, then an ack of the original. The command
refuses while a queue it would touch has consumers (stop the workers first). Interrupted,
it resumes from where it stopped when run again; with nothing left to do, it does nothing.

What it cannot prevent: a retry whose delay expires into the old work queue in the
instant between the last read and the delete is deleted with it. The broker reports how
many messages a delete took, and the command reports any such loss.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from producer import headers
from producer.connection import connect
from producer.exchange import declare_exchange
from producer.publisher import publish_confirmed
from worker.dlq import fresh_copy
from worker.exceptions import TopologyConflict
from worker.recorder import copy_message, settle
from worker.retry import delay_tiers
from worker.settings import EndpointSettings, Settings
from worker.topology import (
    accepts_arguments,
    dead_letter_queue,
    dead_letter_queue_arguments,
    declare_dead_letter_queue,
    declare_endpoint,
    declare_exchanges,
    declare_retry_exchanges,
    delay_exchange,
    delay_label,
    endpoint_queue,
    inspect_queue,
    inspect_queues,
    known_delay_tiers,
    legacy_dead_letter_queue_arguments,
    legacy_delay_queue,
    legacy_work_queue_arguments,
    retry_exchange,
    retry_orphans_exchange,
    work_queue_arguments,
)

Copy = Callable[[AbstractIncomingMessage], aio_pika.Message]


def holding_queue(queue: str) -> str:
    """Where a queue's messages wait while it is recreated."""
    return f"{queue}.upgrading"


@dataclass(frozen=True, slots=True)
class Upgraded:
    queue: str
    moved: int  # messages carried over into the recreated queue
    lost: int = 0  # messages the broker deleted with the old queue (see the module doc)
    removed: bool = False  # an old delay queue, emptied and deleted rather than recreated


class QueueUpgrade:
    """One run of the command over one exchange's queues, on one confirm channel."""

    def __init__(
        self, settings: Settings, connection: AbstractRobustConnection, channel: AbstractChannel
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.channel = channel
        self._exchange_name = settings.broker.exchange

    async def state(self, name: str, arguments: dict[str, Any], legacy: dict[str, Any]) -> str:
        """``missing``, ``current`` (has ``arguments``) or ``legacy`` (has ``legacy``)."""
        if await inspect_queue(self.connection, name) is None:
            return "missing"
        if await accepts_arguments(self.channel, name, arguments):
            return "current"
        if await accepts_arguments(self.channel, name, legacy):
            return "legacy"
        raise TopologyConflict(
            f"{name} exists with arguments no Hookline declared (another broker.queue_type?); "
            "not touched"
        )

    async def refuse_if_consumed(self, *names: str) -> None:
        for name in names:
            inspected = await inspect_queue(self.connection, name)
            if inspected is not None and inspected[1] > 0:
                raise ValueError(f"{name} has {inspected[1]} consumer(s): stop the workers first")

    async def move(
        self, source: str, target: str, copy: Copy, through: AbstractExchange | None = None
    ) -> int:
        """Every message of ``source`` into ``target`` (a queue, or a routing key on
        ``through``): a confirmed copy, then an ack."""
        if await inspect_queue(self.connection, source) is None:
            return 0
        queue = await self.channel.declare_queue(source, passive=True)
        moved = 0
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            await publish_confirmed(
                through or self.channel.default_exchange,
                copy(message),
                target,
                self.settings.broker.publish_timeout_s,
            )
            await settle(message)
            moved += 1
        return moved

    async def delete(self, name: str) -> int:
        """Delete a queue just read empty; returns how many messages the delete took."""
        await self.refuse_if_consumed(name)
        # Quorum queues support neither if-empty nor if-unused deletes.
        result = await self.channel.queue_delete(name, if_unused=False, if_empty=False)
        return int(result.message_count or 0)

    async def declare_holding(self, name: str) -> AbstractQueue:
        return await self.channel.declare_queue(
            holding_queue(name),
            durable=True,
            arguments={"x-queue-type": self.settings.broker.queue_type},
        )

    async def upgrade_dead_letter_queue(self) -> Upgraded | None:
        name = dead_letter_queue(self._exchange_name)
        holding = holding_queue(name)
        state = await self.state(
            name,
            dead_letter_queue_arguments(self.settings),
            legacy_dead_letter_queue_arguments(self.settings),
        )
        resuming = await inspect_queue(self.connection, holding) is not None
        if state in ("missing", "current") and not resuming:
            return None

        def copy_letter(message: AbstractIncomingMessage) -> aio_pika.Message:
            return fresh_copy(message, self._exchange_name)

        lost = 0
        orphans = retry_orphans_exchange(self._exchange_name)
        waiting = await self.declare_holding(name)
        # Orphaned retries (an endpoint retired while they waited) keep a place to go
        # while the dead-letter queue is away.
        await waiting.bind(orphans)
        if state == "legacy":
            await self.move(name, holding, copy_letter)
            lost = await self.delete(name)
        await declare_dead_letter_queue(self.channel, self.settings)
        await (await self.channel.declare_queue(name, passive=True)).bind(orphans)
        await waiting.unbind(orphans)
        moved = await self.move(holding, name, copy_letter)
        await self.delete(holding)
        return Upgraded(name, moved, lost)

    async def upgrade_endpoint_queue(
        self, exchange: AbstractExchange, endpoint: EndpointSettings
    ) -> Upgraded | None:
        name = endpoint_queue(self._exchange_name, endpoint.name)
        holding = holding_queue(name)
        state = await self.state(
            name, work_queue_arguments(self.settings), legacy_work_queue_arguments(self.settings)
        )
        resuming = await inspect_queue(self.connection, holding) is not None
        if state in ("missing", "current") and not resuming:
            return None
        lost = 0
        retries = retry_exchange(self._exchange_name)
        if state == "legacy":
            # Bound before the old queue is unbound: every event, and every retry leaving
            # a shared tier for this endpoint, reaches one of them.
            waiting = await self.declare_holding(name)
            for pattern in endpoint.events:
                await waiting.bind(exchange, routing_key=pattern)
            await waiting.bind(retries, routing_key=name)
            old = await self.channel.declare_queue(name, passive=True)
            for pattern in endpoint.events:
                await old.unbind(exchange, routing_key=pattern)
            await old.unbind(retries, routing_key=name)
            await self.move(name, holding, _moved_copy)
            lost = await self.delete(name)
        # Declared and bound before the holding queue is unbound, as above.
        await declare_endpoint(self.channel, self.settings, endpoint)
        waiting = await self.channel.declare_queue(holding, passive=True)
        for pattern in endpoint.events:
            await waiting.unbind(exchange, routing_key=pattern)
        await waiting.unbind(retries, routing_key=name)
        moved = await self.move(holding, name, _moved_copy)
        await self.delete(holding)
        return Upgraded(name, moved, lost)

    async def retire_legacy_delay_queues(
        self, endpoint: EndpointSettings, tiers: tuple[float, ...]
    ) -> list[Upgraded]:
        """Move the endpoint's pre-0.2 delay queues into the shared tiers; delete them."""
        work = endpoint_queue(self._exchange_name, endpoint.name)
        names = {legacy_delay_queue(self._exchange_name, endpoint.name, d): d for d in tiers}
        found = await inspect_queues(self.connection, names)
        delays = await self.channel.get_exchange(delay_exchange(self._exchange_name))
        configured = set(delay_tiers(self.settings.retry))
        done = []
        for name, delay in names.items():
            if found[name] is None:
                continue
            if delay in configured:
                label = delay_label(delay)
                moved = await self.move(name, work, partial(_retry_copy, tier=label), delays)
            else:
                moved = await self.move(name, work, _moved_copy)
            done.append(Upgraded(name, moved, await self.delete(name), removed=True))
        return done


def _moved_copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    return copy_message(message, headers.without_broker_headers(message.headers))


def _retry_copy(message: AbstractIncomingMessage, tier: str) -> aio_pika.Message:
    """A retry carried from an old delay queue into the shared tier ``tier``."""
    kept = headers.without_broker_headers(message.headers)
    kept[headers.RETRY_DELAY] = tier
    return copy_message(message, kept)


async def upgrade_queues(settings: Settings) -> list[Upgraded]:
    """Recreate every queue of ``settings`` that an earlier Hookline declared with other
    arguments; returns what was recreated (nothing on a second run)."""
    exchange_name = settings.broker.exchange
    connection = await connect(settings.broker, f"hookline-upgrade {exchange_name}")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        run = QueueUpgrade(settings, connection, channel)
        names = [dead_letter_queue(exchange_name)]
        names += [endpoint_queue(exchange_name, e.name) for e in settings.endpoints]
        await run.refuse_if_consumed(*names, *map(holding_queue, names))
        exchange = await declare_exchange(channel, exchange_name)
        await declare_retry_exchanges(channel, exchange_name)
        upgraded = []
        # The dead-letter queue first: recreated work queues dead-letter into it.
        if (done := await run.upgrade_dead_letter_queue()) is not None:
            upgraded.append(done)
        await declare_exchanges(channel, settings)
        tiers = await known_delay_tiers(connection, settings, reads=2)
        for endpoint in settings.endpoints:
            if (done := await run.upgrade_endpoint_queue(exchange, endpoint)) is not None:
                upgraded.append(done)
            else:  # bound to the retry exchange before its old tiers are moved
                await declare_endpoint(channel, settings, endpoint)
            upgraded += await run.retire_legacy_delay_queues(endpoint, tiers)
        return upgraded
    finally:
        await connection.close()


async def run_upgrade(settings: Settings) -> int:
    """The command: one line per recreated queue, or that there was nothing to do."""
    try:
        upgraded = await upgrade_queues(settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for done in upgraded:
        if done.removed:
            print(f"removed {done.queue}: {done.moved} retry(ies) moved out")
        else:
            print(f"upgraded {done.queue}: {done.moved} message(s) carried over")
    if not upgraded:
        print("nothing to upgrade")
    lost = sum(done.lost for done in upgraded)
    if lost:
        print(
            f"error: {lost} message(s) reached an old queue in the instant before it was "
            "deleted (a retry expiring from a delay queue) and were deleted with it",
            file=sys.stderr,
        )
        return 1
    return 0
