"""Operator tools over ``<exchange>.dead-letter``: list, replay, purge.

Messages are read with ``basic.get`` and left unacked while the command runs; those it does
not act on return to the queue when its channel closes, so an interrupted command loses
nothing. A replayed message is removed only after the broker confirmed its copy.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from producer.connection import connect
from producer.publisher import publish_confirmed
from worker.recorder import carried_headers, copy_message, settle
from worker.settings import Settings
from worker.topology import declare_all, declare_dead_letter_queue, endpoint_queue


@dataclass(frozen=True, slots=True)
class DeadLetter:
    event_id: str
    event_type: str
    endpoint: str
    reason: str
    attempts: str
    last_status: str
    dead_lettered_at: str
    detail: str

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> DeadLetter:
        headers = message.headers or {}

        def header(name: str) -> str:
            value = headers.get(name, "")
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

        event_id, event_type = _id_and_type(message.body)
        return cls(
            event_id=event_id or message.message_id or "-",
            event_type=event_type or "-",
            endpoint=header("hookline-endpoint"),
            reason=header("hookline-reason"),
            attempts=header("hookline-attempts"),
            last_status=header("hookline-last-status"),
            dead_lettered_at=header("hookline-dead-lettered-at"),
            detail=header("hookline-detail"),
        )


def _id_and_type(body: bytes) -> tuple[str | None, str | None]:
    """Best effort: dead letters include bodies that are not valid envelopes."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(document, dict):
        return None, None
    event_id, event_type = document.get("id"), document.get("type")
    return (
        event_id if isinstance(event_id, str) else None,
        event_type if isinstance(event_type, str) else None,
    )


@dataclass(frozen=True, slots=True)
class ReplayReport:
    replayed: list[DeadLetter]
    skipped_unknown_endpoint: int


@asynccontextmanager
async def _dead_letter_queue(
    settings: Settings,
) -> AsyncIterator[tuple[AbstractChannel, AbstractQueue]]:
    connection = await connect(settings.broker, f"hookline-dlq {settings.broker.exchange}")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await declare_dead_letter_queue(channel, settings)
        yield channel, queue
    finally:
        await connection.close()


async def _matching(
    queue: AbstractQueue, endpoint: str | None, limit: int | None
) -> AsyncIterator[AbstractIncomingMessage]:
    """Unacked messages of ``endpoint`` (or all), at most ``limit``, one pass over the queue."""
    declared = queue.declaration_result.message_count or 0
    found = 0
    for _ in range(declared):
        if limit is not None and found >= limit:
            return
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            return
        if endpoint is None or (message.headers or {}).get("hookline-endpoint") == endpoint:
            found += 1
            yield message


async def list_dead_letters(
    settings: Settings, *, endpoint: str | None = None, limit: int | None = None
) -> list[DeadLetter]:
    async with _dead_letter_queue(settings) as (_, queue):
        return [
            DeadLetter.from_message(message) async for message in _matching(queue, endpoint, limit)
        ]


async def replay(
    settings: Settings,
    *,
    endpoint: str | None = None,
    limit: int | None = None,
    on_replayed: Callable[[DeadLetter], None] | None = None,
) -> ReplayReport:
    """Send dead letters back to their endpoint's live queue with a fresh attempt count."""
    known = {configured.name for configured in settings.endpoints}
    replayed: list[DeadLetter] = []
    skipped = 0
    async with _dead_letter_queue(settings) as (channel, queue):
        # Replay may run before any worker declared the endpoint queues.
        await declare_all(channel, settings)
        async for message in _matching(queue, endpoint, limit):
            letter = DeadLetter.from_message(message)
            if letter.endpoint not in known:
                skipped += 1
                continue
            await publish_confirmed(
                channel.default_exchange,
                copy_message(message, carried_headers(message.headers)),
                endpoint_queue(settings.broker.exchange, letter.endpoint),
                settings.broker.publish_timeout_s,
            )
            await settle(message)
            replayed.append(letter)
            if on_replayed is not None:
                on_replayed(letter)
    return ReplayReport(replayed=replayed, skipped_unknown_endpoint=skipped)


async def purge(
    settings: Settings, *, endpoint: str | None = None, limit: int | None = None
) -> int:
    """Delete dead letters (of ``endpoint``, at most ``limit``); returns how many."""
    async with _dead_letter_queue(settings) as (_, queue):
        if endpoint is None and limit is None:
            result = await queue.purge()
            return int(result.message_count or 0)
        purged = 0
        async for message in _matching(queue, endpoint, limit):
            if await settle(message):
                purged += 1
        return purged
