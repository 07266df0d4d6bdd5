"""Acking finished deliveries together: one ``basic.ack(multiple=True)`` for many.

Every ack is work for the broker (for a quorum queue, a Raft command), and on a small
machine the broker shares the CPU with the worker. Coalescing acks lets the broker spend
that CPU on deliveries instead. It never acks early: a tag is acked only once its own
outcome is recorded, and a multiple-ack only ever covers tags that have all finished.
Tags above a still-running delivery wait for it at most ``max_hold_s``, then are acked one
by one, so a slow request cannot pin the channel's prefetch window; once that delivery has
itself run longer than ``max_hold_s`` (a hung endpoint), tags behind it are acked one by one
at once. That matters on a channel shared by many endpoints' consumers: without it, every
ack behind one hung endpoint's delivery waited ``max_hold_s``, and its neighbours' prefetch
windows with it (scenario (f) with every consumer on one channel: 0.28x).
"""

from __future__ import annotations

import asyncio
import time

from aio_pika.abc import AbstractIncomingMessage

from producer.connection import BROKER_GONE

FLUSH_DELAY_S = 0.002
MAX_HOLD_S = 0.05


class AckCoalescer:
    """Per channel. ``started`` when a delivery begins, ``await ack`` once it is recorded.

    A multiple-ack goes only as far as every lower tag is settled (acked or nacked), so it
    can never cover a delivery that is still running or has not even started.
    """

    def __init__(self, flush_delay_s: float = FLUSH_DELAY_S, max_hold_s: float = MAX_HOLD_S):
        self._flush_delay_s = flush_delay_s
        self._max_hold_s = max_hold_s
        self._channel: object | None = None
        self._settled_upto = 0  # every tag up to here is settled
        self._settled_above: set[int] = set()  # settled one by one, above _settled_upto
        self._finished: dict[int, tuple[AbstractIncomingMessage, float, asyncio.Future[bool]]] = {}
        self._running_since: dict[int, float] = {}  # started, not yet finished or settled
        self._flusher: asyncio.Task[None] | None = None

    def started(self, message: AbstractIncomingMessage) -> None:
        channel = _channel_of(message)
        if channel is not None and channel is not self._channel:
            self._adopt(channel)
        if channel is not None:
            self._running_since[self._tag(message)] = time.monotonic()

    def forget(self, message: AbstractIncomingMessage) -> None:
        """The delivery was settled another way (nacked)."""
        if _channel_of(message) is self._channel:
            self._settled_above.add(self._tag(message))
            self._running_since.pop(self._tag(message), None)

    async def ack(self, message: AbstractIncomingMessage) -> bool:
        """Resolves once the ack covering ``message`` is written; False if it could not be."""
        if self._channel is None or _channel_of(message) is not self._channel:
            return await _send(message, multiple=False)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._finished[self._tag(message)] = (message, time.monotonic(), future)
        self._running_since.pop(self._tag(message), None)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())
        return await future

    def _adopt(self, channel: object) -> None:
        # A new channel after a reconnect: the old one's tags mean nothing any more, and
        # the broker will redeliver whatever they stood for.
        for _, _, future in self._finished.values():
            if not future.done():
                future.set_result(False)
        self._channel = channel
        self._settled_upto = 0
        self._settled_above.clear()
        self._finished.clear()
        self._running_since.clear()

    @staticmethod
    def _tag(message: AbstractIncomingMessage) -> int:
        assert message.delivery_tag is not None
        return message.delivery_tag

    async def _flush_soon(self) -> None:
        while self._finished:
            await asyncio.sleep(self._flush_delay_s)
            await self._flush()

    async def _flush(self) -> None:
        # Tags mean something only on their channel: if a reconnect adopted a new one
        # while an ack was being sent, everything read before that is stale.
        channel = self._channel
        # The run of tags just above _settled_upto that are all finished or settled.
        tag, last_finished = self._settled_upto + 1, 0
        while tag in self._finished or tag in self._settled_above:
            if tag in self._finished:
                last_finished = tag
            tag += 1
        if last_finished:
            ok = await _send(self._finished[last_finished][0], multiple=True)
            if self._channel is not channel:
                return
            for covered in range(self._settled_upto + 1, last_finished + 1):
                self._resolve(covered, ok)
                self._settled_above.discard(covered)
            self._settled_upto = last_finished
        now = time.monotonic()
        blocking_since = self._running_since.get(self._settled_upto + 1)
        if blocking_since is not None and now - blocking_since > self._max_hold_s:
            deadline = now  # what holds the run back is slow itself: waiting gains nothing
        else:
            deadline = now - self._max_hold_s
        for held in sorted(self._finished):
            entry = self._finished.get(held)
            if entry is None or entry[1] > deadline:
                continue
            sent = await _send(entry[0], multiple=False)
            if self._channel is not channel:
                return
            self._resolve(held, sent)
            self._settled_above.add(held)

    def _resolve(self, tag: int, ok: bool) -> None:
        entry = self._finished.pop(tag, None)
        if entry is not None and not entry[2].done():
            entry[2].set_result(ok)


def _channel_of(message: AbstractIncomingMessage) -> object | None:
    """The channel ``message`` came on, or None once that channel is closed (aio-pika
    raises then): its tag can no longer be acked, and the broker redelivers it."""
    try:
        return message.channel
    except BROKER_GONE:
        return None


async def _send(message: AbstractIncomingMessage, *, multiple: bool) -> bool:
    try:
        await message.channel.basic_ack(message.delivery_tag or 0, multiple=multiple)
    except BROKER_GONE:
        return False
    return True
