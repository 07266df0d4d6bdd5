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


class ScannedQueue:
    """One queue as one command sees it, on a confirm channel of its own. Subclasses say
    how to copy a message so that the copy reads the same (:meth:`fresh_copy`)."""

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
