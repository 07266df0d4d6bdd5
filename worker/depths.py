"""Polling queue depths from the broker into gauges and a snapshot for the status page.

A round costs a bounded number of broker operations, whatever the endpoint count: the
delay-tier manifest, then one passive declare for each of the dead-letter queue, its
overflow queue, the unrouted queue, every known delay tier, and at most
``metrics.queue_polls_per_round`` endpoint work queues. Endpoints that had a backlog at their
last poll are polled every round (the largest first, up to half of that budget): their depth
is what autoscaling and the status page act on. The others take turns in name order, round
after round, so each one's backlog is at most ``ceil(endpoints / queue_polls_per_round)``
rounds old (about two if half the budget goes to backlogged ones); the last seen value is
kept in between.

Dead letters are those in the dead-letter queue and in its overflow queue. Events waiting
for a retry are those in the delay tiers shared by all endpoints, every tier recorded for
the exchange included (earlier schedules' tiers still expire into endpoint queues). The
per-endpoint delay queues of Hookline before 0.2 are not polled: they only drain.

Each round ends with :meth:`worker.series.SeriesBook.update`, which re-evaluates which
endpoints have series of their own from the backlogs seen.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from worker.metrics import Metrics
from worker.retry import delay_tiers
from worker.settings import Settings
from worker.topology import (
    dead_letter_overflow_queue,
    dead_letter_queue,
    delay_label,
    delay_queue,
    endpoint_queue,
    inspect_queues,
    known_delay_tiers,
    unrouted_queue,
)

log = structlog.get_logger("hookline.depths")


@dataclass(slots=True)
class QueueDepths:
    """The poller's figures; ``None`` until the first round succeeded."""

    dead_letter: int | None = None
    unrouted: int | None = None
    # Endpoint -> messages ready at its last poll; an endpoint not polled yet is absent.
    backlog: dict[str, int] = field(default_factory=dict)
    retry_waiting: int | None = None  # every tier together
    retry_waiting_by_delay: dict[str, int] = field(default_factory=dict)  # tier label -> count
    polled_at: float | None = None  # time.time() of the last successful round
    queues_polled: int = 0  # passive declares in the last successful round
    # The last endpoint polled: the next round goes on from the one after it (name order).
    last_endpoint: str = ""


async def poll_depths(
    connection: AbstractRobustConnection,
    current_settings: Callable[[], Settings],
    metrics: Metrics,
    depths: QueueDepths,
    stop: asyncio.Event,
) -> None:
    """Every ``metrics.queue_poll_s``, run :func:`poll_round`, until ``stop`` is set.

    Settings are read afresh on each round, so endpoints added by a reload are polled too.
    Stopped by the event rather than cancelled: cancelling a channel RPC mid-flight makes
    aiormq close the channel, which sets aio-pika's robust recovery going during shutdown.
    """
    while not stop.is_set():
        settings = current_settings()
        try:
            await poll_round(connection, settings, metrics, depths)
        except Exception as exc:  # noqa: BLE001 - a missed poll only leaves gauges stale
            log.info("queue_depth_poll_skipped", error=exc.__class__.__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.metrics.queue_poll_s)


def endpoints_due(names: list[str], last: str, count: int) -> list[str]:
    """The ``count`` endpoints after ``last`` in the sorted ``names``, wrapping round.

    Resuming from a name rather than an index keeps the turns fair across a reload that
    adds or removes endpoints: nobody is skipped because the list shifted.
    """
    start = bisect.bisect_right(names, last)
    due = names[start : start + count]
    if len(due) < count:
        due += names[: min(start, count - len(due))]
    return due


async def poll_round(
    connection: AbstractConnection, settings: Settings, metrics: Metrics, depths: QueueDepths
) -> None:
    """One round: fixed queues, every known tier and this round's share of endpoint queues.
    Nothing in ``depths`` changes unless the whole round succeeds."""
    exchange = settings.broker.exchange
    configured = set(delay_tiers(settings.retry))
    known = await known_delay_tiers(connection, settings)
    names = sorted(endpoint.name for endpoint in settings.endpoints)
    budget = settings.metrics.queue_polls_per_round
    configured_names = set(names)
    backlogged = sorted(
        (n for n, count in depths.backlog.items() if count > 0 and n in configured_names),
        key=lambda name: -depths.backlog[name],
    )[: budget // 2]
    turns = endpoints_due(names, depths.last_endpoint, budget - len(backlogged))
    polled_first = set(backlogged)
    due = [*backlogged, *(name for name in turns if name not in polled_first)]
    fixed = [dead_letter_queue(exchange), dead_letter_overflow_queue(exchange)]
    fixed += [unrouted_queue(exchange)]
    tiers = {delay_queue(exchange, delay): delay for delay in known}
    work = {endpoint_queue(exchange, name): name for name in due}
    found = await inspect_queues(connection, [*fixed, *tiers, *work])

    def ready(name: str) -> int:
        inspected = found[name]
        if inspected is None:
            raise LookupError(f"{name} is missing")
        return inspected[0]

    dead_letter = ready(dead_letter_queue(exchange))
    overflow = found[dead_letter_overflow_queue(exchange)]
    dead_letter += overflow[0] if overflow is not None else 0
    unrouted = ready(unrouted_queue(exchange))
    by_delay: dict[str, int] = {}
    for queue, delay in tiers.items():
        inspected = found[queue]
        # An earlier schedule's tier that is gone held nothing more; a configured one that
        # is missing (deleted by hand) holds nothing either, and is shown as such.
        if inspected is not None or delay in configured:
            by_delay[delay_label(delay)] = inspected[0] if inspected is not None else 0
    backlog = {name: count for name, count in depths.backlog.items() if name in configured_names}
    for queue, name in work.items():
        inspected = found[queue]
        backlog[name] = inspected[0] if inspected is not None else 0  # not declared yet

    metrics.dead_letter_depth.set(dead_letter)
    metrics.unrouted_depth.set(unrouted)
    for label in set(depths.retry_waiting_by_delay) - set(by_delay):
        metrics.retry_waiting.remove(label)
    for label, count in by_delay.items():
        metrics.retry_waiting.labels(tier=label).set(count)
    depths.dead_letter, depths.unrouted = dead_letter, unrouted
    depths.backlog = backlog
    depths.retry_waiting_by_delay = by_delay
    depths.retry_waiting = sum(by_delay.values())
    depths.queues_polled = len(found)
    if turns:
        depths.last_endpoint = turns[-1]
    depths.polled_at = time.time()
    metrics.series.update(backlog, max_series=settings.metrics.max_endpoint_series)
