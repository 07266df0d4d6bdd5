"""Operator tools over ``<exchange>.dead-letter``: list, replay, export, purge, retire.

The queue is read as :mod:`worker.scan` describes: nothing leaves it before its new home
holds it, and read counts are kept far from any delivery limit. Every command first moves
whatever a lower limit (a policy) pushed into ``<exchange>.dead-letter.overflow`` back into
the dead-letter queue, as fresh copies.

Dead letters come from two places. The worker writes its own, with ``hookline-*`` headers
saying why. The broker dead-letters a message from an endpoint's work queue when it is over
a delivery limit: that letter carries the broker's ``x-death`` instead, from which the tools
read the endpoint (the queue's name), the reason (``delivery_limit``) and the time. A retry
whose endpoint was retired while it waited in a shared delay tier reaches the dead-letter
queue through the retry exchange's alternate exchange: its ``x-death`` names the tier and,
as routing key, the endpoint's queue; the tools read it as ``endpoint_removed``.
"""

from __future__ import annotations

import base64
import decimal
import json
import math
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
)

from producer import headers
from producer.connection import connect
from producer.publisher import publish_confirmed
from worker.outcomes import Reason
from worker.ratelimit import TokenBucket
from worker.recorder import Recorder, copy_message, settle
from worker.scan import ScannedQueue, in_window
from worker.settings import Settings
from worker.terminal import ProgressCallback
from worker.topology import (
    dead_letter_overflow_queue,
    declare_all,
    declare_dead_letter_queue,
    endpoint_of_work_queue,
    endpoint_queue,
    endpoint_queue_names,
    inspect_queues,
    is_delay_queue,
    known_delay_tiers,
    retry_exchange,
)

# Exported lines are fsynced, then their messages acked, in batches of this many. Kept
# under the 32 commands a quorum queue client keeps in flight: settles beyond that wait
# in the channel, and are dropped (their messages redelivered) if it closes first.
EXPORT_BATCH = 16
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    event_id: str
    event_type: str
    endpoint: str
    reason: str
    attempts: int
    last_status: str
    dead_lettered_at: str
    detail: str

    @classmethod
    def from_message(
        cls, message: AbstractIncomingMessage, exchange: str | None = None
    ) -> DeadLetter:
        found = message.headers or {}

        def header(name: str) -> str:
            return headers.text(found.get(name))

        event_id, event_type = _id_and_type(message.body)
        death = broker_dead_lettering(found, exchange)
        if death is not None:
            endpoint, from_queue = death
            return cls(
                event_id=event_id or message.message_id or "-",
                event_type=event_type or "-",
                endpoint=endpoint,
                reason=from_queue.reason,
                attempts=headers.attempts_made(found),
                last_status=header(headers.LAST_STATUS) or "none",
                dead_lettered_at=(
                    from_queue.time.isoformat(timespec="seconds") if from_queue.time else ""
                ),
                detail=f"dead-lettered by the broker from {from_queue.queue} ({from_queue.reason})",
            )
        return cls(
            event_id=event_id or message.message_id or "-",
            event_type=event_type or "-",
            endpoint=header(headers.ENDPOINT),
            reason=header(headers.REASON),
            attempts=headers.attempts_made(found),
            last_status=header(headers.LAST_STATUS),
            dead_lettered_at=header(headers.DEAD_LETTERED_AT),
            detail=header(headers.DETAIL),
        )

    @property
    def dead_lettered_time(self) -> datetime | None:
        try:
            return datetime.fromisoformat(self.dead_lettered_at)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command acts on; every given criterion must match."""

    endpoint: str | None = None
    reason: str | None = None
    event_type: str | None = None  # exact, or a topic pattern with * and #
    since: datetime | None = None  # dead-lettered at or after
    until: datetime | None = None  # dead-lettered at or before
    limit: int | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.endpoint is not None and letter.endpoint != self.endpoint:
            return False
        if self.reason is not None and letter.reason != self.reason:
            return False
        if self.event_type is not None and not topic_matches(self.event_type, letter.event_type):
            return False
        return in_window(letter.dead_lettered_time, self.since, self.until)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """RabbitMQ topic semantics: ``*`` is one word, ``#`` zero or more."""

    def match(words: list[str], keys: list[str]) -> bool:
        if not words:
            return not keys
        head, rest = words[0], words[1:]
        if head == "#":
            return any(match(rest, keys[skip:]) for skip in range(len(keys) + 1))
        return bool(keys) and head in ("*", keys[0]) and match(rest, keys[1:])

    return match(pattern.split("."), routing_key.split("."))


def broker_dead_lettering(
    found: dict[str, Any], exchange: str | None = None
) -> tuple[str, headers.Death] | None:
    """(endpoint, death) when the broker dead-lettered this message from an endpoint's work
    queue, or orphaned a retry of a retired endpoint; None for the dead letters the worker
    writes (their copies carry no ``x-death``).

    A letter the dead-letter queue itself pushed into the overflow queue has that death
    first; the work queue's or the tier's, if any, is further down the history.
    """
    for death in headers.deaths(found):
        endpoint = endpoint_of_work_queue(death.queue, exchange)
        if endpoint is not None:
            return endpoint, death
        orphaned = endpoint_of_work_queue(death.routing_key, exchange)
        if orphaned is not None and is_delay_queue(death.queue, exchange):
            return orphaned, replace(death, reason=Reason.ENDPOINT_REMOVED.value)
    return None


def fresh_copy(message: AbstractIncomingMessage, exchange: str) -> aio_pika.Message:
    """A copy of a dead letter to put back in the dead-letter queue, with no broker headers
    (so its delivery count starts again). What the broker's ``x-death`` said about a letter
    it dead-lettered is written into ``hookline-*`` headers, so the copy reads the same."""
    found = message.headers or {}
    death = broker_dead_lettering(found, exchange)
    if death is None:
        return copy_message(message, headers.without_broker_headers(found))
    letter = DeadLetter.from_message(message, exchange)
    return copy_message(
        message,
        headers.dead_letter_headers(
            found,
            endpoint=letter.endpoint,
            reason=letter.reason,
            attempts=headers.attempts_made(found),
            last_status=letter.last_status,
            detail=letter.detail,
            handler_errors=headers.read_count(found, headers.HANDLER_ERRORS),
            dead_lettered_at=death[1].time,
        ),
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


def export_record(message: AbstractIncomingMessage) -> dict[str, Any]:
    """One archived dead letter: its fields, every header, and the body, losslessly.

    Total: every value is made JSON by ``_plain``, so no header type a publisher can send
    stops an export (which would stop at the same message on every rerun).
    """
    record: dict[str, Any] = {
        "dead_letter": _plain(asdict(DeadLetter.from_message(message))),
        "message_id": _plain(message.message_id),
        "headers": _plain(message.headers or {}),
    }
    try:
        record["body"] = message.body.decode("utf-8")
    except UnicodeDecodeError:
        record["body_base64"] = base64.b64encode(message.body).decode("ascii")
    return record


def _plain(value: Any) -> Any:
    """Any AMQP field value (as pamqp decodes it) as strict JSON, keeping what restores it:
    decimals and non-finite floats as their strings (``"1.50"``, ``"NaN"``, ``"-Infinity"``),
    timestamps as ISO 8601, byte strings as text when UTF-8 and otherwise as
    ``{"$bytes_base64": ...}``, tables and arrays element by element; never raises."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Text parsed from a body can hold lone surrogates, which UTF-8 cannot encode.
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"$bytes_base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {_plain(headers.text(key)): _plain(item) for key, item in value.items()}
    return _plain(headers.text(value))


@dataclass(frozen=True, slots=True)
class ReplayReport:
    replayed: list[DeadLetter]
    skipped_unknown_endpoint: int
    dry_run: bool = False


class DeadLetterQueue(ScannedQueue[DeadLetter]):
    """The dead-letter queue as one command sees it."""

    def fresh_copy(self, message: AbstractIncomingMessage) -> aio_pika.Message:
        return fresh_copy(message, self.settings.broker.exchange)

    def record(self, message: AbstractIncomingMessage) -> DeadLetter:
        return DeadLetter.from_message(message, self.settings.broker.exchange)

    async def bring_back_overflow(self) -> int:
        """Move every letter the queue dead-lettered into the overflow queue back in."""
        exchange = self.settings.broker.exchange
        overflow = await self.channel.declare_queue(
            dead_letter_overflow_queue(exchange), passive=True
        )
        moved = 0
        while (message := await overflow.get(no_ack=False, fail=False)) is not None:
            await self.put_back(message)
            moved += 1
        if moved:
            await self.queue.declare()  # the depth the commands read now counts them
        return moved


@asynccontextmanager
async def open_dead_letter_queue(settings: Settings) -> AsyncIterator[DeadLetterQueue]:
    """The dead-letter queue with the overflow queue moved back into it; messages the
    command kept are refreshed as needed when it finishes without an error."""
    connection = await connect(settings.broker, f"hookline-dlq {settings.broker.exchange}")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await declare_dead_letter_queue(channel, settings)
        dead_letters = DeadLetterQueue(settings, connection, channel, queue)
        await dead_letters.bring_back_overflow()
        yield dead_letters
        await dead_letters.refresh_kept()
    finally:
        await connection.close()


async def list_dead_letters(
    settings: Settings, selection: Selection = Selection()
) -> list[DeadLetter]:
    """Matching dead letters, oldest first (a queue holds them in the order they arrived,
    which replays and fresh copies reshuffle)."""
    async with open_dead_letter_queue(settings) as dead_letters:
        found = [letter async for _, letter in dead_letters.matching(selection, keep_all=True)]
    return sorted(
        found,
        key=lambda letter: (letter.dead_lettered_time is None, letter.dead_lettered_time or EPOCH),
    )


async def replay(
    settings: Settings,
    selection: Selection = Selection(),
    *,
    rate_per_s: float | None = None,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    on_replayed: Callable[[DeadLetter], None] | None = None,
) -> ReplayReport:
    """Send dead letters back to their endpoint's live queue with a fresh attempt count.

    ``rate_per_s`` paces the replay so a recovered endpoint is not flooded; ``dry_run``
    reports what would be replayed and changes nothing. ``on_replayed`` hears of each one
    as soon as it is done (so an interrupted replay has said what it did).
    """
    known = {configured.name for configured in settings.endpoints}
    replayed: list[DeadLetter] = []
    skipped = 0
    pace = TokenBucket(rate_per_s) if rate_per_s else None
    async with open_dead_letter_queue(settings) as dead_letters:
        channel = dead_letters.channel
        if not dry_run:
            # Replay may run before any worker declared the endpoint queues.
            await declare_all(channel, settings)
        async for message, letter in dead_letters.matching(selection, progress):
            if letter.endpoint not in known:
                dead_letters.keep(message)
                skipped += 1
                continue
            if not dry_run:
                if pace is not None:
                    await pace.acquire()
                await publish_confirmed(
                    channel.default_exchange,
                    copy_message(message, headers.replay_headers(message.headers)),
                    endpoint_queue(settings.broker.exchange, letter.endpoint),
                    settings.broker.publish_timeout_s,
                )
                await settle(message)
            else:
                dead_letters.keep(message)
            replayed.append(letter)
            if on_replayed is not None:
                on_replayed(letter)
    return ReplayReport(replayed=replayed, skipped_unknown_endpoint=skipped, dry_run=dry_run)


async def export(
    settings: Settings,
    path: Path,
    selection: Selection = Selection(),
    *,
    progress: ProgressCallback | None = None,
) -> int:
    """Append matching dead letters to ``path`` as JSON lines and remove them; returns how many.

    The file is opened for appending, never truncated, so exporting twice into one
    archive adds to it.
    """
    exported = 0
    pending: list[AbstractIncomingMessage] = []
    async with open_dead_letter_queue(settings) as dead_letters:
        with path.open("a", encoding="utf-8") as archive:

            async def commit() -> None:
                archive.flush()
                os.fsync(archive.fileno())
                for message in pending:
                    await settle(message)
                pending.clear()

            async for message, _ in dead_letters.matching(selection, progress):
                archive.write(json.dumps(export_record(message), ensure_ascii=False) + "\n")
                pending.append(message)
                exported += 1
                if len(pending) >= EXPORT_BATCH:
                    await commit()
            await commit()
    return exported


async def purge(settings: Settings, selection: Selection = Selection()) -> int:
    """Delete matching dead letters; returns how many."""
    async with open_dead_letter_queue(settings) as dead_letters:
        return await dead_letters.purge(selection, everything=selection == Selection())


async def count_by_endpoint_and_reason(
    settings: Settings, scan_limit: int
) -> tuple[Counter[tuple[str, str]], int, int]:
    """Dead letters counted by (endpoint, reason) over at most ``scan_limit`` of them;
    returns the counts, how many were read, and how many the queue holds."""
    counts: Counter[tuple[str, str]] = Counter()
    async with open_dead_letter_queue(settings) as dead_letters:
        total = dead_letters.depth
        async for _, letter in dead_letters.matching(Selection(limit=scan_limit), keep_all=True):
            counts[(letter.endpoint, letter.reason)] += 1
    return counts, sum(counts.values()), total


@dataclass(frozen=True, slots=True)
class Retired:
    moved: int  # letters moved into the dead-letter queue
    lost: int  # messages the broker deleted with a queue in the instant after it was emptied


async def retire(settings: Settings, endpoint: str) -> Retired:
    """Move what is left in a removed endpoint's queue into the dead-letter queue (reason
    ``endpoint_removed``), then delete it. Refused while any worker still consumes it.

    The queue is first unbound from the retry exchange: a retry of the endpoint still
    waiting in a shared delay tier then reaches the dead-letter queue by itself when it
    expires (through the retry exchange's alternate exchange), also as ``endpoint_removed``.
    Legacy per-endpoint delay queues (before 0.2), of every delay tier ever recorded for
    the exchange, are emptied first, since they expire into the endpoint's queue.
    """
    if endpoint in {configured.name for configured in settings.endpoints}:
        raise ValueError(f"endpoint {endpoint!r} is still configured; remove it and reload first")
    exchange = settings.broker.exchange
    work_queue = endpoint_queue(exchange, endpoint)
    moved = 0
    async with open_dead_letter_queue(settings) as dead_letters:
        connection, channel = dead_letters.connection, dead_letters.channel
        # Read twice: a tier missed here would later expire into a deleted queue.
        tiers = await known_delay_tiers(connection, settings, reads=2)
        names = endpoint_queue_names(settings, endpoint, tiers)
        found = await inspect_queues(connection, names)
        if not any(found.values()):
            raise ValueError(
                f"no queue of an endpoint named {endpoint!r} exists on the broker: nothing to "
                "retire (check the name; dead letters of a removed endpoint are selected with "
                "`dlq list --endpoint NAME`)"
            )
        work = found.get(work_queue)
        if work is not None and work[1] > 0:
            raise ValueError(
                f"{work_queue} still has {work[1]} consumer(s): reload every worker first"
            )
        recorder = Recorder(exchange, channel.default_exchange, settings.broker.publish_timeout_s)
        lost = 0
        if work is not None:
            queue = await channel.declare_queue(work_queue, passive=True)
            await queue.unbind(retry_exchange(exchange), routing_key=work_queue)
        for name in names:
            if found.get(name) is None:
                continue
            queue = await channel.declare_queue(name, passive=True)
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                await recorder.dead_letter(
                    message,
                    endpoint=endpoint,
                    reason=Reason.ENDPOINT_REMOVED,
                    attempts=headers.attempts_made(message.headers),
                    last_status="none",
                    detail=f"endpoint removed from the config; retired from {name}",
                )
                await settle(message)
                moved += 1
            # Quorum queues support no if-empty delete; nothing routes here any more, and
            # the queue was just read empty.
            deleted = await channel.queue_delete(name, if_unused=False, if_empty=False)
            lost += int(deleted.message_count or 0)
    return Retired(moved, lost)
