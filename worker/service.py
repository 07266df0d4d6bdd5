"""The worker's lifecycle: connect, declare, consume, and stop without losing anything."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
from collections.abc import Callable
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from producer.connection import BROKER_GONE, connect
from producer.exchange import declare_exchange
from worker.channels import close_quietly
from worker.depths import QueueDepths, poll_depths
from worker.endpoints import EndpointSet
from worker.exceptions import ConfigError, HooklineError
from worker.metrics import Metrics
from worker.opsevents import OperationalEvents
from worker.recorder import Recorder
from worker.registry import Registry
from worker.reload import plan_reload
from worker.server import HealthServer
from worker.settings import Settings
from worker.status import build_status
from worker.topology import (
    declare_exchanges,
    declare_retry_tiers,
    delay_exchange,
    record_delay_tiers,
)

CONNECT_RETRY_FIRST_S = 0.5
TIER_RECORDING_FAILURES: tuple[type[BaseException], ...] = (*BROKER_GONE, HooklineError)
RELOAD_DECLARE_FAILURES: tuple[type[BaseException], ...] = (*TIER_RECORDING_FAILURES, TimeoutError)
# A depth poll in progress at shutdown may finish its round (a few passive declares).
POLLER_STOP_S = 5.0
# A reload with a new retry schedule declares its tiers first, within this bound.
RELOAD_DECLARE_TIMEOUT_S = 10.0
# The heap is frozen again once changes have stopped for this long: a full collection at
# 10,000 endpoints takes a noticeable pause, and registry changes can come every second.
REFREEZE_QUIET_S = 2.0
# The worker_starting line names this many endpoints at most.
LOGGED_ENDPOINTS = 100

log = structlog.get_logger("hookline.worker")


class Worker:
    """Runs until :meth:`request_stop`; then drains and closes in the order that loses nothing.

    Shutdown order: stop consuming, let in-flight deliveries finish (bounded by
    ``worker.shutdown_timeout_s``), close the HTTP sessions, the channels (unacked
    messages return to their queues), then the connections.

    :meth:`request_reload` (SIGHUP) re-reads the config through ``load_settings`` and
    applies endpoint changes without dropping or duplicating in-flight deliveries. With
    ``registry.database_url``, the registry's endpoints join the file's, and a change in
    the registry is applied the same way (:mod:`worker.registry`).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        load_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        # As the config file gave them; self.settings adds the registry's endpoints.
        self._file_settings = settings
        self.metrics = (
            metrics
            if metrics is not None
            else Metrics(max_endpoint_series=settings.metrics.max_endpoint_series)
        )
        self._load_settings = load_settings
        self._registry_changed = False
        self.registry = (
            Registry(settings, self.metrics, self._on_registry_change)
            if settings.registry.enabled
            else None
        )
        self.depths = QueueDepths()
        self.health = HealthServer(
            self.metrics,
            self.is_ready,
            settings.metrics.host,
            settings.metrics.port,
            status=self.status,
            detail=self.readiness_detail,
        )
        # Created here, not in run(), so a signal that arrives while start-up is still
        # being scheduled is not lost.
        self._stop_requested = asyncio.Event()
        self._wake = asyncio.Event()
        self._reload_requested = False
        self._consume_connection: AbstractRobustConnection | None = None
        self._publish_connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._operational_events: OperationalEvents | None = None
        self._endpoints: EndpointSet | None = None
        self._started = False
        self._closing = False  # set while the worker closes its own connections
        self._poller: asyncio.Task[None] | None = None
        # Records the delay tiers in the exchange's manifest, retrying until it succeeds.
        self._recording_tiers: asyncio.Task[None] | None = None
        self._stop_polling = asyncio.Event()
        # Freezes the heap again once a reload's replaced consumers have finished.
        self._refreezing: asyncio.Task[None] | None = None

    def request_stop(self) -> None:
        """Safe to call from a signal handler: it only sets flags."""
        self._stop_requested.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Safe to call from a signal handler: it only sets flags."""
        self._reload_requested = True
        self._wake.set()

    def _on_registry_change(self) -> None:
        self._registry_changed = True
        self._wake.set()

    def readiness_detail(self) -> dict[str, Any]:
        """What ``/readyz`` adds to its answer: the registry's state (a database outage
        does not make the worker unready: it delivers with the endpoints it has)."""
        if self.registry is None:
            return {}
        return {"detail": {"registry": self.registry.detail()}}

    def is_ready(self) -> bool:
        return (
            self._started
            and not self._stopping
            and all(
                connection is not None and connection.connected.is_set()
                for connection in (self._consume_connection, self._publish_connection)
            )
            and self._endpoints is not None
            and self._endpoints.all_running()
        )

    def status(self, tenant: str | None = None) -> dict[str, Any]:
        """What the status page shows (``tenant``'s endpoints only, if given); no URLs
        beyond hosts, no secrets."""
        return build_status(
            self.settings,
            self._endpoints.consumers if self._endpoints is not None else [],
            self.depths,
            ready=self.is_ready(),
            tenant=tenant,
        )

    @property
    def _stopping(self) -> bool:
        return self._stop_requested.is_set()

    async def run(self) -> None:
        await self.health.start()
        log.info(
            "worker_starting",
            metrics_port=self.health.port,
            endpoints=[e.name for e in self.settings.endpoints[:LOGGED_ENDPOINTS]],
            endpoints_total=len(self.settings.endpoints),
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        try:
            if self.registry is not None:
                await self.registry.start()
                self._registry_changed = False
                self.settings = self._with_registry(self._file_settings)
            if await self._connect_and_start():
                self._started = True
                self.metrics.ready.set(1)
                log.info(
                    "worker_consuming",
                    broker=self.settings.broker.masked_url,
                    endpoints_total=len(self.settings.endpoints),
                )
                freeze_heap()
                while not self._stopping:
                    await self._wake.wait()
                    self._wake.clear()
                    if self._reload_requested and not self._stopping:
                        self._reload_requested = False
                        await self.reload()
                    # Still set if the reload was rejected: the registry's change is not.
                    if self._registry_changed and not self._stopping:
                        await self.apply(self._file_settings, source="registry")
        finally:
            if self.registry is not None:
                await self.registry.close()
            await self._shutdown()
            await self.health.stop()

    async def _connect_and_start(self) -> bool:
        """Connect and start every endpoint; False if a stop was requested first.

        A broker that does not answer, or a connection lost while starting (RabbitMQ closes
        a connection on a race inside a just-declared quorum queue when several workers
        start at once), is retried with backoff from the beginning.
        """
        delay = CONNECT_RETRY_FIRST_S
        while not self._stopping:
            try:
                self._consume_connection = await self._connect("consume")
                self._publish_connection = await self._connect("publish")
                await self._start_consumers()
                return True
            except BROKER_GONE as exc:
                await self._abandon_start()
                log.warning(
                    "broker_unreachable",
                    broker=self.settings.broker.masked_url,
                    error=exc.__class__.__name__,
                    retry_in_s=round(delay, 2),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), timeout=delay)
                delay = min(delay * 2, self.settings.broker.connect_retry_max_s)
                delay *= random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not cryptography
        return False

    async def _abandon_start(self) -> None:
        """Undo a start that the broker cut short, so the next try begins afresh."""
        self._closing = True
        try:
            if self._endpoints is not None:
                await self._endpoints.discard()
            if self._poller is not None:
                await self._stop_poller()
                self._stop_polling.clear()
            await self._stop_recording_tiers()
            self._endpoints = self._poller = self._publish_channel = None
            self._operational_events = None
            await self._close_connections()
        finally:
            self._closing = False

    async def _connect(self, role: str) -> AbstractRobustConnection:
        # Named so operators (and fault tests) can tell workers' connections apart.
        connection = await connect(
            self.settings.broker, f"hookline-worker {role} {self.settings.broker.exchange}"
        )
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        return connection

    def _on_connection_lost(self, _: Any, exc: BaseException | None = None) -> None:
        self.metrics.broker_connected.set(0)
        if not self._stopping and not self._closing:
            log.warning("broker_connection_lost", error=exc.__class__.__name__ if exc else None)

    def _on_reconnected(self, _: Any) -> None:
        self.metrics.broker_reconnects.inc()
        if self.is_ready():
            self.metrics.broker_connected.set(1)
        log.info("broker_reconnected")

    async def _start_consumers(self) -> None:
        assert self._consume_connection is not None
        assert self._publish_connection is not None
        publish_channel = await self._publish_connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._publish_channel = publish_channel
        await declare_exchanges(publish_channel, self.settings)
        self._record_tiers()
        self._operational_events = OperationalEvents(
            await declare_exchange(publish_channel, self.settings.broker.exchange),
            self.settings.broker.publish_timeout_s,
            enabled=self.settings.operational_events.enabled,
        )
        self._endpoints = EndpointSet(
            settings=self.settings,
            connection=self._consume_connection,
            recorder=Recorder(
                self.settings.broker.exchange,
                publish_channel.default_exchange,
                self.settings.broker.publish_timeout_s,
                delays=await publish_channel.get_exchange(
                    delay_exchange(self.settings.broker.exchange)
                ),
            ),
            metrics=self.metrics,
            operational_events=self._operational_events,
        )
        await self._endpoints.start()
        self.metrics.broker_connected.set(1)
        self._poller = asyncio.create_task(
            poll_depths(
                self._publish_connection,
                lambda: self.settings,
                self.metrics,
                self.depths,
                self._stop_polling,
            ),
            name="poll-queue-depths",
        )

    async def reload(self) -> None:
        """Apply a re-read config: endpoints added, removed or changed; or keep the old one."""
        if self._load_settings is None:
            log.warning("config_reload_unavailable")
            return
        try:
            loaded = self._load_settings()
        except ConfigError as exc:
            log.error("config_reload_rejected", error=str(exc), kept="previous config")
            return
        await self.apply(loaded, source="config")

    def _with_registry(self, file_settings: Settings) -> Settings:
        """The file's settings with the registry's endpoints added (a name the file uses
        stays the file's: the API refuses it, but a row written otherwise is ignored)."""
        if self.registry is None:
            return file_settings
        taken = {endpoint.name for endpoint in file_settings.endpoints}
        extra = [endpoint for endpoint in self.registry.endpoints if endpoint.name not in taken]
        return file_settings.model_copy(update={"endpoints": (*file_settings.endpoints, *extra)})

    async def apply(self, file_settings: Settings, *, source: str) -> None:
        """Apply new settings (from the file, or the registry's endpoints changing); the
        registry's current endpoints are part of either."""
        loaded = self._with_registry(file_settings)
        plan = plan_reload(self.settings, loaded)
        if plan.needs_restart:
            log.warning("config_reload_needs_restart", sections=list(plan.needs_restart))
        schedule_changed = plan.settings.retry.delays_s != self.settings.retry.delays_s
        if schedule_changed and not await self._declare_tiers(plan.settings):
            return
        # What the registry had when the plan was made is applied with it.
        self._registry_changed = False
        # What the reload replaces may be collected; frozen objects never would be (nor
        # would they if an earlier reload's refreeze ran in the middle of this one).
        self._cancel_refreeze()
        gc.unfreeze()
        self._file_settings = plan.settings.model_copy(
            update={"endpoints": file_settings.endpoints}
        )
        self.settings = plan.settings
        if schedule_changed:
            await self._stop_recording_tiers()
            self._record_tiers()
        assert self._operational_events is not None
        assert self._endpoints is not None
        self._operational_events.enabled = plan.settings.operational_events.enabled
        failed = await self._endpoints.apply(plan)
        self._refreeze_when_settled(self._endpoints)
        log.info(
            "config_reloaded",
            source=source,
            added=list(plan.added[:LOGGED_ENDPOINTS]),
            removed=list(plan.removed[:LOGGED_ENDPOINTS]),
            changed=list(plan.changed[:LOGGED_ENDPOINTS]),
            unchanged=len(plan.unchanged),
            failed=failed,
        )

    async def _declare_tiers(self, settings: Settings) -> bool:
        """Declare a new schedule's delay tiers before any retry is sent to them; False
        (and the reload rejected) if the broker refuses or does not answer in time."""
        assert self._publish_connection is not None
        try:
            channel = await self._publish_connection.channel()
            try:
                await asyncio.wait_for(
                    declare_retry_tiers(channel, settings), timeout=RELOAD_DECLARE_TIMEOUT_S
                )
            finally:
                await close_quietly(channel)
        except RELOAD_DECLARE_FAILURES as exc:
            log.error(
                "config_reload_rejected",
                error=str(exc) or exc.__class__.__name__,
                kept="previous config",
                hint="the new retry.delays_s tiers could not be declared",
            )
            return False
        return True

    def _refreeze_when_settled(self, endpoints: EndpointSet) -> None:
        async def refreeze() -> None:
            await endpoints.settled()
            await asyncio.sleep(REFREEZE_QUIET_S)  # a later change cancels this one
            freeze_heap()

        self._refreezing = asyncio.create_task(refreeze(), name="refreeze-heap")

    def _cancel_refreeze(self) -> None:
        if self._refreezing is not None:
            self._refreezing.cancel()
            self._refreezing = None

    async def _shutdown(self) -> None:
        self._closing = True
        self.metrics.ready.set(0)
        refreezing = self._refreezing
        self._cancel_refreeze()
        if refreezing is not None:
            await asyncio.gather(refreezing, return_exceptions=True)
        try:
            if self._endpoints is not None:
                await self._endpoints.stop_consuming()
                await self._endpoints.close(self.settings.worker.shutdown_timeout_s)
            await self._stop_poller()
            await self._stop_recording_tiers()
            if self._operational_events is not None:
                await self._operational_events.close(self.settings.broker.publish_timeout_s)
            if self._publish_channel is not None:
                await close_quietly(self._publish_channel)
        finally:
            # Whatever went wrong above, the connections close: unacked messages return.
            await self._close_connections()
            self.metrics.broker_connected.set(0)
        log.info("worker_stopped")

    def _record_tiers(self) -> None:
        """Record the configured delay tiers in the exchange's manifest (what ``dlq retire``
        and ``status`` read), in the background: that is a confirmed publish, which a broker
        in a resource alarm holds back, and the worker must start all the same. Retried with
        backoff until it succeeds."""
        self._recording_tiers = asyncio.create_task(
            self._keep_recording_tiers(self.settings), name="record-delay-tiers"
        )

    async def _keep_recording_tiers(self, settings: Settings) -> None:
        delay_s = CONNECT_RETRY_FIRST_S
        while True:
            assert self._publish_connection is not None
            try:
                channel = await self._publish_connection.channel()
                try:
                    await record_delay_tiers(channel, settings)
                finally:
                    await close_quietly(channel)
                return
            except TIER_RECORDING_FAILURES as exc:
                log.warning(
                    "delay_tiers_not_recorded", error=exc.__class__.__name__, retry_in_s=delay_s
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, settings.broker.connect_retry_max_s)

    async def _stop_recording_tiers(self) -> None:
        task, self._recording_tiers = self._recording_tiers, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _stop_poller(self) -> None:
        if self._poller is None:
            return
        self._stop_polling.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._poller), timeout=POLLER_STOP_S)
        except TimeoutError:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    async def _close_connections(self) -> None:
        for connection in (self._consume_connection, self._publish_connection):
            if connection is not None:
                await close_quietly(connection)
        self._consume_connection = self._publish_connection = None


def freeze_heap() -> None:
    """Move what exists now (settings, consumers, queues: at 10,000 endpoints, millions of
    objects that live as long as the worker) out of the garbage collector's sight, so its
    full collections no longer walk them: they got slower with every endpoint."""
    gc.collect()
    gc.freeze()
