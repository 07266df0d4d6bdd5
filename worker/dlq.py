"""Operator tools over ``<exchange>.dead-letter``: list, replay, export, purge, retire.

Messages are read with ``basic.get`` and left unacked while the command runs; those it does
not act on return to the queue when its channel closes, so an interrupted command loses
nothing. A message leaves the queue only after its new home holds it: the broker confirmed
the replayed copy, or the exported line was written and fsynced. An interruption between
the two leaves a duplicate (in the endpoint's queue, or in the file), never a gap.
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
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from producer import headers
from producer.connection import connect
from producer.publisher import publish_confirmed
from worker.outcomes import Reason
from worker.ratelimit import TokenBucket
from worker.recorder import Recorder, copy_message, settle
from worker.retry import delay_tiers
from worker.settings import Settings
from worker.topology import (
    declare_all,
    declare_dead_letter_queue,
    delay_queue,
    endpoint_queue,
    inspect_queue,
)

# Exported lines are fsynced, then their messages acked, in batches of this many. Kept
# under the 32 commands a quorum queue client keeps in flight: settles beyond that wait
# in the channel, and are dropped (their messages redelivered) if it closes first.
EXPORT_BATCH = 16

Progress = Callable[[int, int], None]  # (messages looked at, messages in the queue)


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
        found = message.headers or {}

        def header(name: str) -> str:
            value = found.get(name, "")
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

        event_id, event_type = _id_and_type(message.body)
        return cls(
            event_id=event_id or message.message_id or "-",
            event_type=event_type or "-",
            endpoint=header(headers.ENDPOINT),
            reason=header(headers.REASON),
            attempts=header(headers.ATTEMPTS),
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
    limit: int | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.endpoint is not None and letter.endpoint != self.endpoint:
            return False
        if self.reason is not None and letter.reason != self.reason:
            return False
        if self.event_type is not None and not topic_matches(self.event_type, letter.event_type):
            return False
        if self.since is not None:
            moment = letter.dead_lettered_time
            if moment is None or moment < self.since:
                return False
        return True


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


@asynccontextmanager
async def _dead_letter_queue(
    settings: Settings,
) -> AsyncIterator[tuple[AbstractRobustConnection, AbstractChannel, AbstractQueue]]:
    connection = await connect(settings.broker, f"hookline-dlq {settings.broker.exchange}")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await declare_dead_letter_queue(channel, settings)
        yield connection, channel, queue
    finally:
        await connection.close()


async def _matching(
    queue: AbstractQueue, selection: Selection, progress: Progress | None = None
) -> AsyncIterator[tuple[AbstractIncomingMessage, DeadLetter]]:
    """Unacked messages that match ``selection``, in one pass over the queue."""
    declared = queue.declaration_result.message_count or 0
    found = 0
    for seen in range(1, declared + 1):
        if selection.limit is not None and found >= selection.limit:
            return
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            return
        letter = DeadLetter.from_message(message)
        if selection.matches(letter):
            found += 1
            yield message, letter
        if progress is not None:
            progress(seen, declared)


async def list_dead_letters(
    settings: Settings, selection: Selection = Selection()
) -> list[DeadLetter]:
    async with _dead_letter_queue(settings) as (_, _, queue):
        return [letter async for _, letter in _matching(queue, selection)]


async def replay(
    settings: Settings,
    selection: Selection = Selection(),
    *,
    rate_per_s: float | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ReplayReport:
    """Send dead letters back to their endpoint's live queue with a fresh attempt count.

    ``rate_per_s`` paces the replay so a recovered endpoint is not flooded; ``dry_run``
    reports what would be replayed and changes nothing.
    """
    known = {configured.name for configured in settings.endpoints}
    replayed: list[DeadLetter] = []
    skipped = 0
    pace = TokenBucket(rate_per_s) if rate_per_s else None
    async with _dead_letter_queue(settings) as (_, channel, queue):
        if not dry_run:
            # Replay may run before any worker declared the endpoint queues.
            await declare_all(channel, settings)
        async for message, letter in _matching(queue, selection, progress):
            if letter.endpoint not in known:
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
            replayed.append(letter)
    return ReplayReport(replayed=replayed, skipped_unknown_endpoint=skipped, dry_run=dry_run)


async def export(
    settings: Settings,
    path: Path,
    selection: Selection = Selection(),
    *,
    progress: Progress | None = None,
) -> int:
    """Append matching dead letters to ``path`` as JSON lines and remove them; returns how many.

    The file is opened for appending, never truncated, so exporting twice into one
    archive adds to it.
    """
    exported = 0
    pending: list[AbstractIncomingMessage] = []
    async with _dead_letter_queue(settings) as (_, _, queue):
        with path.open("a", encoding="utf-8") as archive:

            async def commit() -> None:
                archive.flush()
                os.fsync(archive.fileno())
                for message in pending:
                    await settle(message)
                pending.clear()

            async for message, _ in _matching(queue, selection, progress):
                archive.write(json.dumps(export_record(message), ensure_ascii=False) + "\n")
                pending.append(message)
                exported += 1
                if len(pending) >= EXPORT_BATCH:
                    await commit()
            await commit()
    return exported


async def purge(settings: Settings, selection: Selection = Selection()) -> int:
    """Delete matching dead letters; returns how many."""
    async with _dead_letter_queue(settings) as (_, _, queue):
        if selection == Selection():
            result = await queue.purge()
            return int(result.message_count or 0)
        purged = 0
        async for message, _ in _matching(queue, selection):
            if await settle(message):
                purged += 1
        return purged


async def count_by_endpoint_and_reason(
    settings: Settings, scan_limit: int
) -> tuple[Counter[tuple[str, str]], int, int]:
    """Dead letters counted by (endpoint, reason) over at most ``scan_limit`` of them;
    returns the counts, how many were read, and how many the queue holds."""
    counts: Counter[tuple[str, str]] = Counter()
    async with _dead_letter_queue(settings) as (_, _, queue):
        total = int(queue.declaration_result.message_count or 0)
        async for _, letter in _matching(queue, Selection(limit=scan_limit)):
            counts[(letter.endpoint, letter.reason)] += 1
    return counts, sum(counts.values()), total


async def retire(settings: Settings, endpoint: str) -> int:
    """Move what is left in a removed endpoint's queue and delay queues into the dead-letter
    queue (reason ``endpoint_removed``), then delete those queues; returns how many moved.

    Delay queues are found by the current ``retry.delays_s`` and emptied first, since
    they expire into the endpoint's queue. Refused while any worker still consumes it.
    """
    if endpoint in {configured.name for configured in settings.endpoints}:
        raise ValueError(f"endpoint {endpoint!r} is still configured; remove it and reload first")
    exchange = settings.broker.exchange
    work_queue = endpoint_queue(exchange, endpoint)
    names = [delay_queue(exchange, endpoint, delay) for delay in delay_tiers(settings.retry)]
    names.append(work_queue)
    moved = 0
    async with _dead_letter_queue(settings) as (connection, channel, _):
        work = await inspect_queue(connection, work_queue)
        if work is not None and work[1] > 0:
            raise ValueError(
                f"{work_queue} still has {work[1]} consumer(s): reload every worker first"
            )
        recorder = Recorder(exchange, channel.default_exchange, settings.broker.publish_timeout_s)
        for name in names:
            if await inspect_queue(connection, name) is None:
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
            await queue.delete(if_unused=False, if_empty=False)
    return moved
