"""The endpoints a worker delivers to, each with its consume channel, HTTP client and
consumer: the running set, which the worker (and a reload) drives through :meth:`start`,
:meth:`apply`, :meth:`stop_consuming` and :meth:`close`.

One lock serialises every change to the set: the first start, a reload's changes, a start
retried in the background after the broker refused it, and the stop. So a start retried in
the background can never register a consumer for an endpoint that a later reload changed
(old URL, old secret) or removed (re-binding it), and stopping stops every consumer,
including one that a background start had just registered. Within a change, endpoints are
started :data:`START_CONCURRENCY` at a time: at 10,000 endpoints a start is broker round
trips, not work.

An endpoint costs a queue, a consumer and a few objects; its HTTP connection pool exists
only while it has work (closed after :data:`worker.delivery.IDLE_CLOSE_S` idle), and its
channel is shared beyond ``worker.channel_per_endpoint_up_to`` endpoints (see
:mod:`worker.channels`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from producer.connection import BROKER_GONE
from worker.channels import ChannelPool, ConsumeChannel, close_quietly
from worker.consumer import EndpointConsumer, prefetch_for
from worker.delivery import IDLE_CLOSE_S, IDLE_SWEEP_S, EndpointClient, client_tls_context
from worker.exceptions import HooklineError
from worker.metrics import Metrics
from worker.opsevents import OperationalEvents
from worker.recorder import Recorder
from worker.reload import ReloadPlan
from worker.settings import EndpointSettings, Settings
from worker.topology import Probe, count_waiting, endpoint_queue, unbind_patterns

# Endpoints started (declared, bound, subscribed) at the same time.
START_CONCURRENCY = 128
# Channels on which queue declarations are tried first (see worker.topology.Probe).
PROBE_CHANNELS = 16
RETRY_FIRST_DELAY_S = 0.5
# The endpoint_removed line waits at most this long for its count of what is left.
COUNT_WAIT_S = 5.0
# What a failed start of one endpoint may raise: the broker refused (a topology conflict)
# or went away (which, as BROKER_GONE says, covers aio-pika's RuntimeErrors too). Anything
# else propagates.
START_FAILURES: tuple[type[BaseException], ...] = (HooklineError, *BROKER_GONE)

log = structlog.get_logger("hookline.worker")


@dataclass(slots=True)
class RunningEndpoint:
    channel: ConsumeChannel
    client: EndpointClient
    consumer: EndpointConsumer


class EndpointSet:
    """Starts, changes and stops endpoint consumers on the worker's consume connection."""

    def __init__(
        self,
        *,
        settings: Settings,
        connection: AbstractRobustConnection,
        recorder: Recorder,
        metrics: Metrics,
        operational_events: OperationalEvents,
    ) -> None:
        self.settings = settings
        self._connection = connection
        self._recorder = recorder
        self._metrics = metrics
        self._operational_events = operational_events
        self._running: dict[str, RunningEndpoint] = {}
        self._lock = asyncio.Lock()
        self._closed = False
        self._pool = ChannelPool(
            connection, dedicated_up_to=settings.worker.channel_per_endpoint_up_to
        )
        self._tls = client_tls_context(settings)
        # Opened by start(): the probe's anchor, so a refused declare closes none of the
        # consumers' channels.
        self._anchor: AbstractChannel | None = None
        self._probe: Probe | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Starts being retried after the broker refused them, by endpoint name.
        self._retrying: dict[str, asyncio.Task[None]] = {}
        # Consumers replaced or removed, finishing their in-flight deliveries.
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def consumers(self) -> list[EndpointConsumer]:
        return [running.consumer for running in self._running.values()]

    def all_running(self) -> bool:
        """Every started consumer is running (an endpoint whose start is being retried after
        a reload does not make the worker unready: the others deliver)."""
        return all(running.consumer.running for running in self._running.values())

    async def settled(self) -> None:
        """Returns once the consumers a reload replaced or removed have finished."""
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def in_flight_tasks(self) -> set[asyncio.Task[Any]]:
        return set().union(
            *(running.consumer.in_flight_tasks for running in self._running.values())
        )

    @property
    def size(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        """Start every configured endpoint; a refusal here is the caller's to report (the
        starts still running are cancelled first)."""
        async with self._lock:
            self._anchor = await self._connection.channel()
            self._probe = Probe(self._anchor, size=PROBE_CHANNELS)

            await _bounded(map(self._start, self.settings.endpoints), START_CONCURRENCY)
        self._sweeper = asyncio.create_task(self._sweep_idle_clients(), name="sweep-http")

    async def apply(self, plan: ReloadPlan) -> list[str]:
        """Apply a reload: endpoints removed, changed and added. Returns the names whose
        new consumer could not start yet; those are retried in the background."""
        failed: list[str] = []
        async with self._lock:
            if self._closed:
                return failed
            previous = {endpoint.name: endpoint for endpoint in self.settings.endpoints}
            if plan.settings.security.ca_bundle != self.settings.security.ca_bundle:
                # Every endpoint is in plan.changed then: their new clients use this one.
                self._tls = client_tls_context(plan.settings)
            self.settings = plan.settings
            wanted = {endpoint.name: endpoint for endpoint in plan.settings.endpoints}

            async def apply_one(name: str) -> None:
                # A start still being retried is for a version this plan supersedes.
                self._stop_retrying(name)
                try:
                    if name in plan.removed:
                        await self._remove(name, previous[name])
                    else:
                        await self._replace(name, wanted[name], previous.get(name))
                except START_FAILURES as exc:
                    failed.append(name)
                    reason = str(exc) or exc.__class__.__name__
                    log.error("config_reload_failed", endpoint=name, error=reason)
                    if name not in plan.removed:
                        self._retry_start(wanted[name])

            # Removals first, so their channels' room is free for what is added.
            await _bounded(map(apply_one, plan.removed), START_CONCURRENCY)
            await _bounded(map(apply_one, (*plan.changed, *plan.added)), START_CONCURRENCY)
        return failed

    async def stop_consuming(self) -> None:
        """Stop taking messages on every endpoint; no start can happen afterwards."""
        async with self._lock:
            self._closed = True
            await self._stop_sweeping()
            for name in list(self._retrying):
                self._stop_retrying(name)
            # Together: with the broker away, each cancel waits out its bound.
            await asyncio.gather(
                *(running.consumer.stop_consuming() for running in self._running.values())
            )

    async def discard(self) -> None:
        """After the connection was lost while starting: nothing is said to the broker
        (its consumers end with the connection); HTTP clients are closed and in-flight
        deliveries cancelled (their messages were not acked)."""
        self._closed = True
        await self._stop_sweeping()
        for name in list(self._retrying):
            self._stop_retrying(name)
        await drain(self.in_flight_tasks(), timeout_s=0)
        for running in self._running.values():
            await running.client.close()

    async def close(self, drain_timeout_s: float) -> None:
        """After :meth:`stop_consuming`: let deliveries finish within the bound, then close
        HTTP clients and channels (messages not acked return to their queues)."""
        await drain(self.in_flight_tasks(), drain_timeout_s)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        running = list(self._running.values())
        for each in running:
            await each.client.close()
        for each in reversed(running):
            if each.channel.dedicated:
                await close_quietly(each.channel.channel)
        await self._pool.close()
        if self._probe is not None:
            await self._probe.close()
        if self._anchor is not None:
            await close_quietly(self._anchor)

    async def _start(self, endpoint: EndpointSettings) -> None:
        assert self._probe is not None
        channel = await self._pool.acquire(
            prefetch=prefetch_for(self.settings, endpoint), endpoints=len(self.settings.endpoints)
        )
        client = EndpointClient(self.settings, endpoint, tls=self._tls)
        consumer = EndpointConsumer(
            settings=self.settings,
            endpoint=endpoint,
            channel=channel,
            probe=self._probe,
            client=client,
            recorder=self._recorder,
            metrics=self._metrics,
            operational_events=self._operational_events,
        )
        try:
            await consumer.start()
        except BaseException:
            await client.close()
            await self._pool.release(channel, consumer.queue)
            raise
        self._running[endpoint.name] = RunningEndpoint(channel, client, consumer)

    async def _sweep_idle_clients(self) -> None:
        """Close HTTP pools that have been idle long enough; the next attempt reopens."""
        while True:
            await asyncio.sleep(IDLE_SWEEP_S)
            closed = 0
            for running in list(self._running.values()):
                closed += await running.client.close_if_idle(IDLE_CLOSE_S)
            if closed:
                log.debug("http_pools_closed", idle=closed)

    async def _stop_sweeping(self) -> None:
        task, self._sweeper = self._sweeper, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _replace(
        self, name: str, endpoint: EndpointSettings, before: EndpointSettings | None
    ) -> None:
        """Stop the old consumer (if any), start the new one, let the old one finish.

        Messages the old consumer had not started go back to the queue unattempted and
        reach the new one; those it had started finish under the old settings, so nothing
        is attempted twice or dropped.
        """
        running = self._running.pop(name, None)
        dropped = set(before.events if before is not None else ()) - set(endpoint.events)
        if before is not None and before.from_registry:
            dropped = set()  # the API unbound them with the change itself
        if running is not None:
            try:
                await running.consumer.stop_consuming()
                if dropped:
                    await self._unbind(running, dropped)
            finally:
                self._retire(running)
        elif dropped:
            # Its start was being retried: a failed start may have bound before it failed.
            await self._unbind_elsewhere(name, dropped)
        await self._start(endpoint)

    async def _remove(self, name: str, before: EndpointSettings) -> None:
        """Unbind it so no new events queue up, and leave what is queued where it is."""
        running = self._running.pop(name, None)
        # The API unbinds a registry endpoint before its row goes; unbinding here, later,
        # could undo the bindings of an endpoint of the same name created since.
        patterns = () if before.from_registry else before.events
        if running is not None:
            try:
                await running.consumer.stop_consuming()
                await self._unbind(running, patterns)
            finally:
                self._retire(running)
        elif patterns:
            # Its start was being retried: a failed start may have bound before it failed.
            await self._unbind_elsewhere(name, patterns)
        self._metrics.forget_endpoint(name)
        queued: int | None = None
        with contextlib.suppress(Exception):  # only the count in the log line is missed
            # Its work queue and every delay tier that can still hold its events; bounded,
            # since the set's lock is held and the broker may be away.
            queued = await asyncio.wait_for(
                count_waiting(self._connection, self.settings, name), timeout=COUNT_WAIT_S
            )
        log.warning(
            "endpoint_removed",
            endpoint=name,
            queued=queued,
            hint="its queue and delay queues are kept: re-add the endpoint to deliver them, "
            "or `python -m worker dlq retire` to move them to the dead-letter queue",
        )

    async def _unbind(self, running: RunningEndpoint, patterns: Iterable[str]) -> None:
        # Through the queue object that bound them, so the robust channel forgets them too.
        queue = running.consumer.queue
        if queue is not None:
            await unbind_patterns(queue, self.settings.broker.exchange, patterns)

    async def _unbind_elsewhere(self, name: str, patterns: Iterable[str]) -> None:
        """Unbind ``patterns`` from an endpoint queue this worker does not consume (if the
        queue exists), on a channel of its own."""
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(
                endpoint_queue(self.settings.broker.exchange, name), passive=True
            )
            await unbind_patterns(queue, self.settings.broker.exchange, patterns)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return  # never declared: nothing was bound
        finally:
            await close_quietly(channel)

    def _retire(self, running: RunningEndpoint) -> None:
        task = asyncio.create_task(
            self._finish(running), name=f"retire-{running.consumer.endpoint.name}"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _finish(self, running: RunningEndpoint) -> None:
        await drain(running.consumer.in_flight_tasks, self.settings.worker.shutdown_timeout_s)
        await running.client.close()
        await self._pool.release(running.channel, running.consumer.queue)

    def _retry_start(self, endpoint: EndpointSettings) -> None:
        task = asyncio.create_task(
            self._start_with_backoff(endpoint), name=f"start-{endpoint.name}"
        )
        self._retrying[endpoint.name] = task

    def _stop_retrying(self, name: str) -> None:
        task = self._retrying.pop(name, None)
        if task is not None:
            task.cancel()

    async def _start_with_backoff(self, endpoint: EndpointSettings) -> None:
        delay_s = RETRY_FIRST_DELAY_S
        me = asyncio.current_task()
        while True:
            await asyncio.sleep(delay_s)
            async with self._lock:
                if self._closed or self._retrying.get(endpoint.name) is not me:
                    return  # stopping, or a later reload superseded this version
                try:
                    await self._start(endpoint)
                except START_FAILURES as exc:
                    log.warning(
                        "endpoint_start_failed",
                        endpoint=endpoint.name,
                        error=exc.__class__.__name__,
                        retry_in_s=delay_s,
                    )
                else:
                    del self._retrying[endpoint.name]
                    log.info("endpoint_started", endpoint=endpoint.name)
                    return
            delay_s = min(delay_s * 2, self.settings.broker.connect_retry_max_s)


async def _bounded(starts: Iterable[Coroutine[Any, Any, None]], concurrency: int) -> None:
    """Run ``starts`` at most ``concurrency`` at a time; on the first failure, cancel the
    rest and raise it."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(start: Coroutine[Any, Any, None]) -> None:
        try:
            async with semaphore:
                await start
        finally:
            start.close()  # one cancelled before it began is not "never awaited"

    tasks = [asyncio.create_task(one(start)) for start in starts]
    if not tasks:
        return
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            raise failure


async def drain(in_flight: Iterable[asyncio.Task[Any]], timeout_s: float) -> None:
    """Wait for deliveries to finish, at most ``timeout_s``; cancel what is left (their
    messages were not acked, so the broker hands them out again)."""
    tasks = set(in_flight)
    if not tasks:
        return
    log.info("worker_draining", in_flight=len(tasks), timeout_s=timeout_s)
    _, unfinished = await asyncio.wait(tasks, timeout=timeout_s)
    for task in unfinished:
        task.cancel()
    if unfinished:
        log.warning("worker_drain_timed_out", abandoned=len(unfinished))
        await asyncio.wait(unfinished, timeout=5)
