"""The metrics port: ``/metrics``, ``/healthz``, ``/readyz``, and the read-only status page
at ``/`` with its data at ``/status.json`` (``?tenant=T``: only that tenant's endpoints)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.exceptions import ListenError
from worker.metrics import Metrics
from worker.settings import TENANT_RE

STATUS_PAGE = resources.files("worker").joinpath("status_page.html")
# The page is self-contained (inline CSS and script): nothing may load from elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'; img-src data:",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class HealthServer:
    def __init__(
        self,
        metrics: Metrics,
        is_ready: Callable[[], bool],
        host: str,
        port: int,
        status: Callable[[str | None], dict[str, Any]] | None = None,
        detail: Callable[[], dict[str, Any]] | None = None,
    ):
        self._metrics = metrics
        self._is_ready = is_ready
        self._status = status
        # What /readyz adds to its answer beside "status".
        self._detail = detail
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self._status is not None:
            app.router.add_get("/", self._status_page)
            app.router.add_get("/status.json", self._status_json)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ListenError(
                f"metrics server cannot listen on {self._host}:{self._port}: {exc.strerror}"
            ) from None
        address = self._runner.addresses[0]
        self.port = int(address[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics_page(self, _: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        # Answering at all proves the event loop runs.
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = self._is_ready()
        self._metrics.ready.set(1 if ready else 0)
        answer: dict[str, Any] = {"status": "ready" if ready else "not ready"}
        if self._detail is not None:
            answer = {**self._detail(), **answer}
        return web.json_response(answer, status=200 if ready else 503)

    async def _status_page(self, _: web.Request) -> web.Response:
        return web.Response(
            text=STATUS_PAGE.read_text("utf-8"), content_type="text/html", headers=PAGE_HEADERS
        )

    async def _status_json(self, request: web.Request) -> web.Response:
        assert self._status is not None
        tenants = request.query.getall("tenant", [])
        # An empty value (a cleared form field) asks for every endpoint, as no value does.
        tenant = tenants[0] if len(tenants) == 1 and tenants[0] else None
        if len(tenants) > 1 or (tenant is not None and not TENANT_RE.fullmatch(tenant)):
            return web.json_response(
                {
                    "error": "tenant must be one value of 1-128 characters from "
                    "[A-Za-z0-9_.:@-], starting with a letter or digit"
                },
                status=400,
                headers={"Cache-Control": "no-store"},
            )
        return web.json_response(self._status(tenant), headers={"Cache-Control": "no-store"})
