"""Operator tools over ``<exchange>.unrouted``: list, replay, purge.

That bounded queue keeps the newest events that matched no endpoint when they were
published by a client other than the SDK (the SDK gets them returned instead). ``list``
shows which event types nobody subscribes to; ``replay``, after an endpoint for them was
added, publishes them again through the exchange, with their routing key, mandatory: an
event still matching no endpoint is kept where it is, never sent round again.

The queue is read as :mod:`worker.scan` describes: nothing leaves it before the broker
confirmed its copy, and read counts are kept far from any delivery limit.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from producer import headers
from producer.connection import connect
from producer.exceptions import Unroutable
from producer.exchange import declare_exchange
from producer.publisher import publish_confirmed
from worker.dlq import topic_matches
from worker.ratelimit import TokenBucket
from worker.recorder import copy_message, settle
from worker.scan import ScannedQueue, in_window
from worker.settings import Settings
from worker.terminal import ProgressCallback
from worker.topology import declare_unrouted_queue


@dataclass(frozen=True, slots=True)
class UnroutedEvent:
    event_id: str
    event_type: str  # the routing key it was published with
    published_at: str  # RFC 3339, or "" when unknown
    size_bytes: int

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> UnroutedEvent:
        published = published_time(message)
        return cls(
            event_id=_event_id(message.body) or message.message_id or "-",
            event_type=routing_key_of(message),
            published_at=published.isoformat(timespec="seconds") if published else "",
            size_bytes=len(message.body),
        )

    @property
    def published_time(self) -> datetime | None:
        return datetime.fromisoformat(self.published_at) if self.published_at else None


def routing_key_of(message: AbstractIncomingMessage) -> str:
    """The routing key the event was published with; a fresh copy made by these tools
    travels through the default exchange, so it carries the original in a header."""
    kept = headers.text((message.headers or {}).get(headers.ROUTING_KEY))
    return kept or message.routing_key or ""


def published_time(message: AbstractIncomingMessage) -> datetime | None:
    """When the event was published: ``hookline-published-at`` if set, else the AMQP
    ``timestamp`` property, else unknown."""
    published_ms = headers.published_at_ms(message.headers)
    if published_ms is not None:
        return datetime.fromtimestamp(published_ms / 1000, UTC)
    moment = message.timestamp
    if moment is not None:
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return None


def _event_id(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    event_id = document.get("id") if isinstance(document, dict) else None
    return event_id if isinstance(event_id, str) else None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which unrouted events a command acts on; every given criterion must match."""

    event_type: str | None = None  # exact, or a topic pattern with * and #
    since: datetime | None = None  # published at or after
    until: datetime | None = None  # published at or before
    limit: int | None = None

    def matches(self, event: UnroutedEvent) -> bool:
        if self.event_type is not None and not topic_matches(self.event_type, event.event_type):
            return False
        return in_window(event.published_time, self.since, self.until)


class UnroutedQueue(ScannedQueue[UnroutedEvent]):
    """The unrouted queue as one command sees it."""

    def record(self, message: AbstractIncomingMessage) -> UnroutedEvent:
        return UnroutedEvent.from_message(message)

    def fresh_copy(self, message: AbstractIncomingMessage) -> aio_pika.Message:
        copied = headers.without_broker_headers(message.headers)
        copied[headers.ROUTING_KEY] = routing_key_of(message)
        return copy_message(message, copied)


@asynccontextmanager
async def open_unrouted_queue(settings: Settings) -> AsyncIterator[UnroutedQueue]:
    connection = await connect(settings.broker, f"hookline-unrouted {settings.broker.exchange}")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await declare_unrouted_queue(channel, settings)
        unrouted = UnroutedQueue(settings, connection, channel, queue)
        yield unrouted
        await unrouted.refresh_kept()
    finally:
        await connection.close()


async def list_unrouted(
    settings: Settings, selection: Selection = Selection()
) -> list[UnroutedEvent]:
    """Matching events, oldest first."""
    async with open_unrouted_queue(settings) as unrouted:
        found = [event async for _, event in unrouted.matching(selection, keep_all=True)]
    return sorted(found, key=lambda event: (event.published_at == "", event.published_at))


def count_by_type(events: list[UnroutedEvent]) -> list[tuple[str, int]]:
    """Event types nobody subscribes to, most frequent first."""
    return Counter(event.event_type for event in events).most_common()


@dataclass(frozen=True, slots=True)
class ReplayReport:
    replayed: list[UnroutedEvent]
    still_unrouted: int
    dry_run: bool = False


async def replay(
    settings: Settings,
    selection: Selection = Selection(),
    *,
    rate_per_s: float | None = None,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    on_replayed: Callable[[UnroutedEvent], None] | None = None,
) -> ReplayReport:
    """Publish matching events again through the exchange with their routing key, each
    confirmed before its original leaves the queue. Mandatory and marked as the SDK marks
    its events, so one that still matches no endpoint comes back to this command and is
    kept, instead of being captured a second time."""
    replayed: list[UnroutedEvent] = []
    still_unrouted = 0
    pace = TokenBucket(rate_per_s) if rate_per_s else None
    async with open_unrouted_queue(settings) as unrouted:
        exchange = await declare_exchange(unrouted.channel, settings.broker.exchange)
        async for message, event in unrouted.matching(selection, progress):
            if dry_run:
                unrouted.keep(message)
            else:
                if pace is not None:
                    await pace.acquire()
                copied = headers.replay_headers(message.headers)
                copied[headers.MANDATORY] = "1"
                try:
                    await publish_confirmed(
                        exchange,
                        copy_message(message, copied),
                        event.event_type,
                        settings.broker.publish_timeout_s,
                    )
                except Unroutable:
                    unrouted.keep(message)
                    still_unrouted += 1
                    continue
                await settle(message)
            replayed.append(event)
            if on_replayed is not None:
                on_replayed(event)
    return ReplayReport(replayed=replayed, still_unrouted=still_unrouted, dry_run=dry_run)


async def purge(settings: Settings, selection: Selection = Selection()) -> int:
    """Delete matching events; returns how many."""
    async with open_unrouted_queue(settings) as unrouted:
        return await unrouted.purge(selection, everything=selection == Selection())
