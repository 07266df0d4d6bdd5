"""Reading a queue message by message for an operator command, losing nothing.

Messages are read with ``basic.get`` and left unacked while the command runs; those it does
not act on return to the queue when its channel closes, so an interrupted command loses
nothing. A message leaves the queue only after its new home holds it (a confirmed copy, or
a written and fsynced line); an interruption between the two leaves a duplicate, never a
gap.

Each return counts as a delivery on a quorum queue (``x-delivery-count``), and RabbitMQ
4.0-4.2 count every return towards a default delivery limit of 20. So a message a command
returns with a count of ``REFRESH_AT_DELIVERY_COUNT`` or more is replaced by a fresh copy
at the queue's tail (confirmed, then the original acked), once the command has read
everything (so a copy is never read twice).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Generic, Protocol, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from producer import headers
from producer.publisher import publish_confirmed
from worker.recorder import settle
from worker.settings import Settings
from worker.terminal import ProgressCallback

# Far below the delivery limit of 20 that RabbitMQ 4.0-4.2 apply to quorum queues by
# default, and rare enough to cost little.
REFRESH_AT_DELIVERY_COUNT = 10


Record = TypeVar("Record")
Seen = TypeVar("Seen", contravariant=True)


class Selection(Protocol[Seen]):
    """Which messages a command acts on: what ``matches``, at most ``limit`` of them."""

    @property
    def limit(self) -> int | None: ...

    def matches(self, record: Seen, /) -> bool: ...


def in_window(moment: datetime | None, since: datetime | None, until: datetime | None) -> bool:
    """Whether ``moment`` lies in [``since``, ``until``] (either end may be open); an unknown
    moment lies in no bounded window."""
    if since is None and until is None:
        return True
    if moment is None:
        return False
    return (since is None or moment >= since) and (until is None or moment <= until)


class ScannedQueue(Generic[Record]):
    """One queue as one command sees it, on a confirm channel of its own. Subclasses say
    what a message means to the command (:meth:`record`) and how to copy one so that the
    copy reads the same (:meth:`fresh_copy`)."""

    def __init__(
        self,
        settings: Settings,
        connection: AbstractRobustConnection,
        channel: AbstractChannel,
        queue: AbstractQueue,
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.channel = channel
        self.queue = queue
        self._to_refresh: list[AbstractIncomingMessage] = []

    @property
    def depth(self) -> int:
        return int(self.queue.declaration_result.message_count or 0)

    def record(self, message: AbstractIncomingMessage) -> Record:
        raise NotImplementedError

    def fresh_copy(self, message: AbstractIncomingMessage) -> aio_pika.Message:
        raise NotImplementedError

    def keep(self, message: AbstractIncomingMessage) -> None:
        """``message`` stays in the queue: it returns when the channel closes, unless its
        delivery count calls for a fresh copy (made when the command finishes)."""
        if headers.delivery_count(message.headers) >= REFRESH_AT_DELIVERY_COUNT:
            self._to_refresh.append(message)

    async def put_back(self, message: AbstractIncomingMessage) -> None:
        """Replace ``message`` by a fresh copy at the queue's tail: confirmed, then acked."""
        await publish_confirmed(
            self.channel.default_exchange,
            self.fresh_copy(message),
            self.queue.name,
            self.settings.broker.publish_timeout_s,
        )
        await settle(message)

    async def refresh_kept(self) -> None:
        for message in self._to_refresh:
            await self.put_back(message)
        self._to_refresh.clear()

    async def scan(
        self, progress: ProgressCallback | None = None
    ) -> AsyncIterator[AbstractIncomingMessage]:
        """Every message in the queue when the scan starts, once, unacked."""
        declared = self.depth
        for seen in range(1, declared + 1):
            message = await self.queue.get(no_ack=False, fail=False)
            if message is None:
                return
            yield message
            if progress is not None:
                progress(seen, declared)

    async def purge(self, selection: Selection[Record], everything: bool) -> int:
        """Delete what matches ``selection`` (the whole queue at once when ``everything``);
        returns how many."""
        if everything:
            result = await self.queue.purge()
            return int(result.message_count or 0)
        purged = 0
        async for message, _ in self.matching(selection):
            if await settle(message):
                purged += 1
        return purged

    async def matching(
        self,
        selection: Selection[Record],
        progress: ProgressCallback | None = None,
        *,
        keep_all: bool = False,
    ) -> AsyncIterator[tuple[AbstractIncomingMessage, Record]]:
        """Unacked messages that match ``selection``, in one pass over the queue. Those that
        do not match are kept; so are those that do when ``keep_all`` (read-only commands)."""
        found = 0
        async for message in self.scan(progress):
            record = self.record(message)
            if not selection.matches(record):
                self.keep(message)
                continue
            found += 1
            if keep_all:
                self.keep(message)
            yield message, record
            if selection.limit is not None and found >= selection.limit:
                return
