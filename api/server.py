"""The API process: connect to PostgreSQL, serve, connect to RabbitMQ, and stop cleanly.

It listens before RabbitMQ answers (``/healthz`` is up, ``/readyz`` says the broker is
not, and writes answer 503), so that a broker outage at start-up does not get the process
restarted by its liveness probe; the broker is connected in the background with backoff.
Signal handlers only set a flag; the server then stops taking requests, lets those in
progress finish (aiohttp's shutdown timeout) and closes the broker and the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import structlog
from aiohttp import web

from api import store
from api.app import Api
from api.broker import Broker
from api.metrics import ApiMetrics
from api.migrate import pending
from producer.connection import BROKER_GONE
from worker.exceptions import ConfigError, HooklineError, ListenError, RegistryUnavailable
from worker.registry import DATABASE_FAILURES
from worker.settings import Settings

SHUTDOWN_TIMEOUT_S = 10.0
BROKER_RETRY_FIRST_S = 0.5

log = structlog.get_logger("hookline.api")


class ApiServer:
    def __init__(self, settings: Settings, metrics: ApiMetrics | None = None) -> None:
        if not settings.registry.enabled:
            raise ConfigError(
                "registry.database_url (or HOOKLINE_DATABASE_URL) must be set to run the API"
            )
        self.settings = settings
        self.metrics = metrics if metrics is not None else ApiMetrics()
        self._stop = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.broker = Broker(settings)
        self.port: int | None = None
        self.api: Api | None = None

    def request_stop(self) -> None:
        """Safe to call from a signal handler: it only sets a flag."""
        self._stop.set()

    async def start(self) -> None:
        try:
            pool = await store.open_pool(self.settings)
        except DATABASE_FAILURES as exc:
            raise RegistryUnavailable(
                f"cannot reach the registry database: {exc.__class__.__name__}"
            ) from None
        try:
            async with pool.acquire() as connection:
                missing = await pending(connection)
            if missing:
                raise ConfigError(
                    f"the registry database needs migrations ({', '.join(missing)}): "
                    "run `python -m api migrate`"
                )
            self.api = Api(self.settings, pool, self.broker, self.metrics)
            app = self.api.application()

            async def close(_: web.Application) -> None:
                await self.broker.close()
                await pool.close()

            app.on_cleanup.append(close)
            self._runner = web.AppRunner(
                app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
            )
            await self._runner.setup()
        except BaseException:
            await pool.close()
            raise
        site = web.TCPSite(self._runner, self.settings.api.host, self.settings.api.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ListenError(
                f"the API cannot listen on {self.settings.api.host}:{self.settings.api.port}: "
                f"{exc.strerror}"
            ) from None
        self.port = int(self._runner.addresses[0][1])
        log.info(
            "api_listening",
            host=self.settings.api.host,
            port=self.port,
            config_endpoints=len(self.settings.endpoints),
        )
        self._connecting = asyncio.create_task(self._connect_broker(), name="connect-broker")

    async def broker_connected(self) -> None:
        """Returns once the first connection to RabbitMQ is made."""
        if self._connecting is not None:
            await asyncio.shield(self._connecting)

    async def _connect_broker(self) -> None:
        """Connect, retrying with backoff while the broker does not answer (as a worker
        does); after the first connection, the robust connection reconnects by itself."""
        delay_s = BROKER_RETRY_FIRST_S
        while True:
            try:
                await self.broker.start()
                log.info("api_broker_connected", broker=self.settings.broker.masked_url)
                return
            except Exception as exc:  # noqa: BLE001 - away or refusing: writes answer 503 meanwhile
                log.warning(
                    "broker_unreachable",
                    broker=self.settings.broker.masked_url,
                    error=str(exc) if isinstance(exc, HooklineError) else exc.__class__.__name__,
                    retry_in_s=round(delay_s, 2),
                )
                await self.broker.close()
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, self.settings.broker.connect_retry_max_s)
            delay_s *= random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not cryptography

    async def stop(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
            self._connecting = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def run(self) -> None:
        await self.start()
        try:
            await self._stop.wait()
        finally:
            with contextlib.suppress(*BROKER_GONE):
                await self.stop()
        log.info("api_stopped")
