"""The HTTP API: routes, authentication, and every error translated in one place.

Writes follow one rule: the database row and the broker's queue change together. An
endpoint is inserted, its queue declared and bound, then the transaction commits; if the
broker refuses or is away, the transaction rolls back and the answer is 503, so there is
never a row without its queue. A delete unbinds before the row goes. The notification
that tells the workers is sent by PostgreSQL at commit (see :mod:`worker.registry`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from api import models, store
from api.broker import Broker
from api.keys import Principal
from api.metrics import ApiMetrics
from api.openapi import openapi_document
from producer.settings import field_errors
from worker import dlq
from worker.exceptions import BrokerUnavailable, SecretUnreadable
from worker.registry import (
    DATABASE_FAILURES,
    PG_GONE,
    endpoint_from_row,
    header_context,
    open_headers,
    signing_secrets,
)
from worker.secretbox import SecretBox
from worker.sendtest import send_test
from worker.settings import (
    ENDPOINT_NAME_RE,
    PATTERN_WORD_RE,
    TENANT_RE,
    EndpointSettings,
    Settings,
    display_url,
)
from worker.signing import generate_secret

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)

# Who is calling, set by the authentication middleware for the request's handler.
CALLER: ContextVar[Principal] = ContextVar("hookline_api_caller")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
DEFAULT_RECOVER_RATE_PER_S = 50.0
RECOVERY_ABANDONED = "the API process running it stopped before it finished; start it again"
# A recovery writes its progress (and heartbeat) to its row this often.
RECOVERY_PROGRESS_S = 2.0
# Held while a recovery scans the dead-letter queue; "dlqscan" in ASCII.
DLQ_SCAN_LOCK_ID = 0x646C717363616E
DLQ_SCAN_POLL_S = 1.0
# Test sends at once per API process, and the longest one waits for an answer.
TEST_SENDS = 16
TEST_TIMEOUT_S = 30.0
NULLABLE = frozenset({"filter", "timeout_s", "max_in_flight", "rate_limit_per_s", "description"})
# The first word of Hookline's operational events (hookline.endpoint.failing, ...).
OPERATIONAL_EVENTS_WORD = "hookline"
RECOVERY_ID_RE = re.compile(r"^rcv_[0-9a-f]{16}$")

log = structlog.get_logger("hookline.api")


class ApiError(Exception):
    """An answer other than success; rendered as ``{"error": {...}}`` by the middleware."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        errors: list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.headers = dict(headers or {})


def not_found(name: str) -> ApiError:
    # The same answer whether the endpoint does not exist or belongs to another tenant.
    return ApiError(404, "not_found", f"no endpoint named {name!r}")


class Api:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        broker: Broker,
        metrics: ApiMetrics,
    ) -> None:
        self.settings = settings
        self._pool = pool
        self._broker = broker
        self._metrics = metrics
        self._box = SecretBox.from_setting(settings.registry.secret_key)
        self._config = {endpoint.name: endpoint for endpoint in settings.endpoints}
        self._recoveries: set[asyncio.Task[None]] = set()
        self._dlq_scan = asyncio.Lock()
        # Each test send holds an outgoing connection for up to TEST_TIMEOUT_S.
        self._test_sends = asyncio.Semaphore(TEST_SENDS)

    def application(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.api.max_body_bytes,
            middlewares=[self._errors, self._authenticate],
        )
        routes = [
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
            web.get("/openapi.json", self.openapi),
            web.post("/v1/endpoints", self.create),
            web.get("/v1/endpoints", self.list),
            web.get("/v1/endpoints/{name}", self.get),
            web.patch("/v1/endpoints/{name}", self.patch),
            web.delete("/v1/endpoints/{name}", self.delete),
            web.post("/v1/endpoints/{name}/pause", self.pause),
            web.post("/v1/endpoints/{name}/resume", self.resume),
            web.post("/v1/endpoints/{name}/secret/rotate", self.rotate),
            web.post("/v1/endpoints/{name}/test", self.test),
            web.post("/v1/endpoints/{name}/recover", self.recover),
            web.get("/v1/recoveries/{id}", self.get_recovery),
        ]
        app.add_routes(routes)
        app.on_cleanup.append(self._stop_recoveries)
        return app

    # -- middleware -------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = _route(request)
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error_response(_from_http(exc))
        except PG_GONE as exc:
            log.warning("api_database_unavailable", route=route, error=exc.__class__.__name__)
            response = _error_response(
                ApiError(503, "database_unavailable", "the registry database is unavailable")
            )
        except asyncpg.DataError:
            # A value the database cannot hold that validation let through.
            response = _error_response(
                ApiError(400, "invalid_value", "a value cannot be stored (NUL or out of range)")
            )
        except BrokerUnavailable as exc:
            log.warning("api_broker_unavailable", route=route, error=str(exc))
            response = _error_response(
                ApiError(503, "broker_unavailable", "RabbitMQ is unavailable or refused")
            )
        except Exception as exc:
            log.error("api_request_failed", route=route, error=exc.__class__.__name__, exc_info=exc)
            response = _error_response(ApiError(500, "internal_error", "internal error"))
        self._metrics.observe(request.method, route, response.status, started)
        return response

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        principal = None
        if scheme.lower() == "bearer" and token.strip():
            async with self._pool.acquire() as connection:
                principal = await store.principal(connection, token.strip())
        if principal is None:
            raise ApiError(
                401,
                "unauthorized",
                "a valid API key is required: Authorization: Bearer hlk_...",
                headers={"WWW-Authenticate": 'Bearer realm="hookline"'},
            )
        # A context variable rather than request storage: the handler runs in this task,
        # and aiohttp's typed request keys are newer than its floor here.
        caller = CALLER.set(principal)
        try:
            return await handler(request)
        finally:
            CALLER.reset(caller)

    # -- open routes ------------------------------------------------------------------

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        detail: dict[str, Any] = {"broker": self._broker.connected}
        try:
            async with self._pool.acquire(timeout=2) as connection:
                await connection.fetchval("SELECT 1", timeout=2)
            detail["database"] = True
        except DATABASE_FAILURES:
            detail["database"] = False
        ready = all(detail.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "detail": detail},
            status=200 if ready else 503,
        )

    async def metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, _: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    # -- endpoints --------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        body = await _parse(request, models.EndpointCreate)
        if not principal.admin:
            if body.tenant is not None and body.tenant != principal.tenant:
                raise ApiError(403, "forbidden", "a tenant key creates its own tenant's endpoints")
            body = body.model_copy(update={"tenant": principal.tenant})
        values = body.model_dump()
        secret = generate_secret()
        endpoint = self._validated(values, secret)
        self._check_subscriptions(principal, endpoint)
        if endpoint.name in self._config:
            raise _name_taken(endpoint.name)
        declared = False
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                if endpoint.tenant is not None:
                    count = await store.lock_tenant(connection, endpoint.tenant)
                    limit = self.settings.registry.max_endpoints_per_tenant
                    if count >= limit:
                        raise ApiError(
                            409,
                            "tenant_endpoint_limit",
                            f"tenant {endpoint.tenant!r} has {count} endpoints, the most "
                            f"registry.max_endpoints_per_tenant allows ({limit})",
                        )
                await store.lock_name(connection, endpoint.name)
                deleted = await store.deleted_name(connection, endpoint.name)
                if (
                    deleted is not None
                    and not principal.admin
                    and deleted["tenant"] != principal.tenant
                ):
                    raise _name_taken(endpoint.name)
                values["filter"] = endpoint.filter_document
                values["headers"] = self._sealed_headers(endpoint.name, endpoint.headers)
                row = await store.insert_endpoint(
                    connection, values, self._box.seal(secret, endpoint.name)
                )
                if row is None:
                    raise _name_taken(endpoint.name)
                # Declared and bound only if its queue is empty: a queue holding events is
                # a deleted endpoint's, whose events are not for this one.
                # Set first: a declare cut short may have bound some patterns already.
                declared = True
                queued = await self._broker.declare(endpoint)
                if queued:
                    if not principal.admin:
                        raise _name_taken(endpoint.name)
                    raise ApiError(
                        409,
                        "name_has_queued_events",
                        f"a deleted endpoint named {endpoint.name!r} left {queued} events in its "
                        "queue; choose another name, or move them to the dead-letter queue "
                        f"(python -m worker dlq retire --endpoint {endpoint.name}), create the "
                        "endpoint, then recover them",
                    )
                if deleted is not None:
                    # Its tenant's own name back: its dead letters are its own. A name an
                    # admin gives to another tenant starts a new history.
                    same_owner = deleted["tenant"] == endpoint.tenant
                    row["recover_after"] = await store.take_name(
                        connection, endpoint.name, keep_history=deleted if same_owner else None
                    )
        except BaseException:
            # Rolled back, or the commit failed, after the queue was declared: no queue may
            # collect events for an endpoint that does not exist (unbinding is idempotent,
            # and a queue this create made is removed if it is still empty).
            if declared:
                await _quietly(self._broker.unbind(endpoint.name, endpoint.events))
                await _quietly(self._broker.delete_if_empty(endpoint.name))
            raise
        log.info("endpoint_created", endpoint=endpoint.name, tenant=endpoint.tenant)
        view = models.EndpointCreated(**_view(row).model_dump(), secret=secret)
        return _json(view, status=201, headers=_etag(row, f"/v1/endpoints/{endpoint.name}"))

    async def list(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        query = request.query
        tenant = query.get("tenant")
        if tenant is not None and (
            len(query.getall("tenant")) > 1 or not TENANT_RE.fullmatch(tenant)
        ):
            raise ApiError(400, "bad_request", "tenant must be one valid tenant label")
        if not principal.admin:
            if tenant is not None and tenant != principal.tenant:
                raise ApiError(403, "forbidden", "a tenant key lists its own tenant's endpoints")
            tenant = principal.tenant
        limit = _int_query(query, "limit", models.DEFAULT_PAGE, 1, models.MAX_PAGE)
        after = _cursor(query.get("cursor"))
        async with self._pool.acquire() as connection:
            rows = await store.list_endpoints(
                connection, tenant=tenant, after=after, limit=limit + 1
            )
        views = [_view(row) for row in rows]
        views += [
            _config_view(endpoint)
            for name, endpoint in self._config.items()
            if (after is None or name > after) and (tenant is None or endpoint.tenant == tenant)
        ]
        views.sort(key=lambda view: view.name)
        page, more = views[:limit], len(views) > limit
        next_cursor = _encode_cursor(page[-1].name) if more and page else None
        return _json(models.EndpointPage(data=page, next_cursor=next_cursor))

    async def get(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        name = _name(request)
        configured = self._config.get(name)
        if configured is not None and principal.may_see(configured.tenant):
            return _json(_config_view(configured))
        async with self._pool.acquire() as connection:
            row = await store.get_endpoint(connection, name)
        row = _visible(row, principal, name)
        return _json(_view(row), headers=_etag(row))

    async def patch(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        name = self._writable(request)
        body = await _parse(request, models.EndpointPatch)
        changes = {field: getattr(body, field) for field in body.model_fields_set}
        for field, value in changes.items():
            if value is None and field not in NULLABLE:
                raise ApiError(
                    422, "invalid", "invalid endpoint", [(field, "may be changed, not cleared")]
                )
        expected = _if_match(request)
        bound: list[str] = []
        unbound: list[str] = []
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                row = _visible(
                    await store.get_endpoint(connection, name, for_update=True), principal, name
                )
                if expected is not None and expected != row["version"]:
                    raise ApiError(
                        412,
                        "version_mismatch",
                        f"the endpoint is at version {row['version']}, not {expected}",
                        headers={"ETag": f'"{row["version"]}"'},
                    )
                if not changes:
                    return _json(_view(row), headers=_etag(row))
                current = {field: row[field] for field in store.WRITABLE}
                if "headers" not in changes:  # replaced headers need not open
                    current["headers"] = self._opened_headers(name, row["headers"])
                endpoint = self._validated({**current, "name": name, **changes}, generate_secret())
                if "events" in changes:
                    self._check_subscriptions(principal, endpoint)
                if "filter" in changes:
                    changes["filter"] = endpoint.filter_document
                if "headers" in changes:
                    changes["headers"] = self._sealed_headers(name, endpoint.headers)
                updated = await store.update_endpoint(connection, name, changes)
                added = [p for p in endpoint.events if p not in row["events"]]
                dropped = [p for p in row["events"] if p not in endpoint.events]
                # Each set is recorded before its call: one cut short may have done part.
                if added:
                    bound = added
                    await self._broker.bind(name, added)
                if dropped:
                    unbound = dropped
                    await self._broker.unbind(name, dropped)
        except BaseException:
            # Rolled back, or the commit failed: the bindings follow the row.
            if bound:
                await _quietly(self._broker.unbind(name, bound))
            if unbound:
                await _quietly(self._broker.bind(name, unbound))
            raise
        log.info("endpoint_changed", endpoint=name, fields=sorted(changes))
        return _json(_view(updated), headers=_etag(updated))

    async def delete(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        name = self._writable(request)
        unbound: list[str] = []
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                await store.lock_name(connection, name)
                row = _visible(
                    await store.get_endpoint(connection, name, for_update=True), principal, name
                )
                # First, so that no event queues up for an endpoint that is about to go.
                unbound = row["events"]
                await self._broker.unbind(name, row["events"])
                await store.delete_endpoint(connection, row)
        except BaseException:
            if unbound:
                await _quietly(self._broker.bind(name, unbound))
            raise
        queued = None
        with contextlib.suppress(BrokerUnavailable):  # only the count in the answer is missed
            queued = await self._broker.queued(name)
        log.info("endpoint_deleted", endpoint=name, queued=queued)
        return _json(models.Deleted(name=name, queued=queued))

    async def pause(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, paused=True)

    async def resume(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, paused=False)

    async def _set_paused(self, request: web.Request, *, paused: bool) -> web.Response:
        principal = CALLER.get()
        name = self._writable(request)
        async with self._pool.acquire() as connection, connection.transaction():
            row = _visible(
                await store.get_endpoint(connection, name, for_update=True), principal, name
            )
            if row["paused"] != paused:
                row = await store.update_endpoint(connection, name, {"paused": paused})
        log.info("endpoint_paused" if paused else "endpoint_resumed", endpoint=name)
        return _json(_view(row), headers=_etag(row))

    async def rotate(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        name = self._writable(request)
        body = await _parse(request, models.RotateSecret, empty_ok=True)
        secret = generate_secret()
        async with self._pool.acquire() as connection, connection.transaction():
            row = _visible(
                await store.get_endpoint(connection, name, for_update=True), principal, name
            )
            secrets = store.rotated_secrets(
                row["secrets"], self._box.seal(secret, name), now=time.time(), grace_s=body.grace_s
            )
            updated = await store.update_endpoint(connection, name, {"secrets": secrets})
        ends = [entry["expires_at"] for entry in secrets[1:]]
        log.info("endpoint_secret_rotated", endpoint=name, grace_s=body.grace_s)
        return _json(
            models.SecretRotated(
                name=name,
                secret=secret,
                previous_secret_expires_at=_time(max(ends)) if ends else None,
            ),
            headers=_etag(updated),
        )

    async def test(self, request: web.Request) -> web.Response:
        endpoint = await self._endpoint(request)
        timeout_s = min(self.settings.timeout_for(endpoint), TEST_TIMEOUT_S)
        async with self._test_sends:
            event_id, result = await send_test(
                self.settings,
                endpoint.model_copy(update={"timeout_s": timeout_s}),
                sender="the Hookline API",
            )
        return _json(
            models.SendTestResult(
                event_id=event_id,
                delivered=result.delivered,
                status=result.status,
                error=str(result.error) if result.error is not None else None,
                duration_ms=round(result.duration_s * 1000, 1),
                detail=result.detail,
            )
        )

    async def recover(self, request: web.Request) -> web.Response:
        body = await _parse(request, models.RecoverRequest)
        endpoint, recover_after = await self._endpoint_and_history(request)
        rate = body.rate_per_s or DEFAULT_RECOVER_RATE_PER_S
        # Never before the name passed to this endpoint's tenant: what was dead-lettered
        # earlier belongs to the name's previous owner.
        since = body.since if recover_after is None else max(body.since, recover_after)
        async with self._pool.acquire() as connection, connection.transaction():
            row = await store.insert_recovery(
                connection,
                endpoint=endpoint.name,
                tenant=endpoint.tenant,
                since=since,
                until=body.until,
                rate_per_s=rate,
            )
        if row is None:
            raise ApiError(
                409,
                "recovery_running",
                "a recovery of this tenant's is still running; wait for it to finish",
            )
        selection = dlq.Selection(endpoint=endpoint.name, since=since, until=body.until)
        task = asyncio.create_task(
            self._run_recovery(row["id"], endpoint, selection, rate), name=f"recover-{row['id']}"
        )
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)
        log.info("endpoint_recovery_started", endpoint=endpoint.name, recovery=row["id"])
        return _json(
            models.Recovery.model_validate(row),
            status=202,
            headers={"Location": f"/v1/recoveries/{row['id']}"},
        )

    async def get_recovery(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        recovery_id = request.match_info["id"]
        if not RECOVERY_ID_RE.fullmatch(recovery_id):
            raise ApiError(404, "not_found", "no such recovery")
        async with self._pool.acquire() as connection:
            row = await store.get_recovery(connection, recovery_id)
        if row is None or not principal.may_see(row["tenant"]):
            raise ApiError(404, "not_found", "no such recovery")
        silent_s = (datetime.now(UTC) - row["heartbeat_at"]).total_seconds()
        if row["status"] == "running" and silent_s > store.RECOVERY_DEAD_AFTER_S:
            row = {**row, "status": "failed", "error": RECOVERY_ABANDONED}
        return _json(models.Recovery.model_validate(row))

    # -- helpers ----------------------------------------------------------------------

    def _validated(self, values: dict[str, Any], secret: str) -> EndpointSettings:
        """The endpoint as a worker will load it, or 422 with the same messages as the
        config file gives."""
        document = {key: value for key, value in values.items() if value is not None}
        document["secret"] = secret
        try:
            endpoint = EndpointSettings.model_validate(document, context={"environ": {}})
        except ValidationError as exc:
            raise ApiError(422, "invalid", "invalid endpoint", field_errors(exc)) from None
        problems = self.settings.endpoint_problems(endpoint)
        if problems:
            raise ApiError(422, "invalid", "invalid endpoint", problems)
        return endpoint

    def _check_subscriptions(self, principal: Principal, endpoint: EndpointSettings) -> None:
        """A tenant key subscribes only within its tenant's event types, unless
        ``registry.tenant_events`` is ``any``."""
        if principal.admin or self.settings.registry.tenant_events == "any":
            return
        tenant = principal.tenant or ""
        if tenant == OPERATIONAL_EVENTS_WORD:
            raise ApiError(
                403, "forbidden", "hookline.* are Hookline's own events: an admin key subscribes"
            )
        if not PATTERN_WORD_RE.fullmatch(tenant):
            raise ApiError(
                403,
                "forbidden",
                f"tenant {tenant!r} is not one event-type word: its endpoints are created "
                "with an admin key",
            )
        outside = [p for p in endpoint.events if p.split(".", 1)[0] != tenant]
        if outside:
            raise ApiError(
                422,
                "invalid",
                "invalid endpoint",
                [
                    (
                        "events",
                        f"a tenant key subscribes to its own event types only ({tenant}.*, "
                        f"{tenant}.#, ...): {', '.join(outside[:5])} "
                        + ("are" if len(outside) > 1 else "is")
                        + " outside them",
                    )
                ],
            )

    def _sealed_headers(self, name: str, headers: Mapping[str, str]) -> dict[str, str]:
        return {
            header: self._box.seal(value, header_context(name, header))
            for header, value in headers.items()
        }

    def _opened_headers(self, name: str, sealed: Mapping[str, str]) -> dict[str, str]:
        try:
            return open_headers(self._box, name, sealed)
        except SecretUnreadable as exc:
            raise _unusable(name, str(exc)) from None

    def _writable(self, request: web.Request) -> str:
        name = _name(request)
        configured = self._config.get(name)
        if configured is not None and CALLER.get().may_see(configured.tenant):
            raise ApiError(
                409, "read_only", f"{name!r} is defined in the config file; change it there"
            )
        return name

    async def _endpoint(self, request: web.Request) -> EndpointSettings:
        """The endpoint a request names, with the secrets signing now."""
        endpoint, _ = await self._endpoint_and_history(request)
        return endpoint

    async def _endpoint_and_history(
        self, request: web.Request
    ) -> tuple[EndpointSettings, datetime | None]:
        """The endpoint a request names and its ``recover_after`` (see the migration);
        409 if its row is one the rules no longer accept."""
        principal = CALLER.get()
        name = _name(request)
        configured = self._config.get(name)
        if configured is not None and principal.may_see(configured.tenant):
            return configured, None
        async with self._pool.acquire() as connection:
            row = _visible(await store.get_endpoint(connection, name), principal, name)
        try:
            endpoint = endpoint_from_row(row, self._box, time.time())
        except ValidationError as exc:
            raise _unusable(name, "its stored values are refused", field_errors(exc)) from None
        except (ValueError, SecretUnreadable) as exc:
            raise _unusable(name, str(exc)) from None
        return endpoint, row["recover_after"]

    async def _run_recovery(
        self,
        recovery_id: str,
        endpoint: EndpointSettings,
        selection: dlq.Selection,
        rate_per_s: float,
    ) -> None:
        """One scan of the dead-letter queue at a time, in this process (a lock) and
        across API processes (an advisory lock): a scan holds what it has read until it
        ends, which a second scan would not see."""
        replayed = 0
        error: str | None = None

        def one_more(_: dlq.DeadLetter) -> None:
            nonlocal replayed
            replayed += 1

        heartbeat = asyncio.create_task(self._heartbeat(recovery_id, lambda: replayed))
        settings = self.settings.model_copy(
            update={"endpoints": (*self.settings.endpoints, endpoint)}
            if endpoint.name not in self._config
            else {}
        )
        try:
            async with self._dlq_scan, self._pool.acquire() as holder:
                # Polled, not waited for in one query: the pool's command timeout would end
                # a wait for another API process's long scan.
                while True:
                    if await holder.fetchval("SELECT pg_try_advisory_lock($1)", DLQ_SCAN_LOCK_ID):
                        break
                    await asyncio.sleep(DLQ_SCAN_POLL_S)
                try:
                    await dlq.replay(
                        settings, selection, rate_per_s=rate_per_s, on_replayed=one_more
                    )
                finally:
                    with contextlib.suppress(*DATABASE_FAILURES):
                        await holder.execute("SELECT pg_advisory_unlock($1)", DLQ_SCAN_LOCK_ID)
        except asyncio.CancelledError:
            error = RECOVERY_ABANDONED
            raise
        except Exception as exc:  # noqa: BLE001 - reported on the recovery, not lost
            # The tenant reads this: no hosts, ports or classes; the log has the detail.
            error = "the dead-letter queue could not be read or written; try again later"
            log.warning(
                "endpoint_recovery_failed", recovery=recovery_id, error=exc.__class__.__name__
            )
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await asyncio.shield(self._finish_recovery(recovery_id, replayed, error))
        log.info("endpoint_recovery_finished", recovery=recovery_id, replayed=replayed)

    async def _heartbeat(self, recovery_id: str, replayed: Callable[[], int]) -> None:
        """Progress, and a sign of life (see store.RECOVERY_DEAD_AFTER_S)."""
        while True:
            await asyncio.sleep(RECOVERY_PROGRESS_S)
            try:
                async with self._pool.acquire() as connection:
                    await store.count_recovered(connection, recovery_id, replayed())
            except DATABASE_FAILURES as exc:
                log.warning("endpoint_recovery_progress_lost", error=exc.__class__.__name__)

    async def _finish_recovery(self, recovery_id: str, replayed: int, error: str | None) -> None:
        try:
            async with self._pool.acquire() as connection:
                await store.finish_recovery(connection, recovery_id, replayed=replayed, error=error)
        except DATABASE_FAILURES as exc:
            log.warning("endpoint_recovery_not_recorded", error=exc.__class__.__name__)

    async def _stop_recoveries(self, _: web.Application) -> None:
        for task in self._recoveries:
            task.cancel()
        await asyncio.gather(*self._recoveries, return_exceptions=True)


# -- translation ------------------------------------------------------------------------


def _route(request: web.Request) -> str:
    """The route's template (bounded label values), not the path."""
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


def _error_response(error: ApiError) -> web.Response:
    body = models.ErrorBody(
        error=models.ErrorDetail(
            code=error.code,
            message=error.message,
            errors=[models.FieldError(field=f, message=m) for f, m in error.errors]
            if error.errors is not None
            else None,
        )
    )
    return web.json_response(
        body.model_dump(exclude_none=True), status=error.status, headers=error.headers
    )


HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def _from_http(exc: web.HTTPException) -> ApiError:
    code = HTTP_CODES.get(exc.status, "bad_request")
    message = exc.reason if exc.status != 413 else "the body is larger than api.max_body_bytes"
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return ApiError(exc.status, code, message, headers=headers)


async def _parse(request: web.Request, model: type[M], *, empty_ok: bool = False) -> M:
    """The body as ``model``: 415 if it is not JSON, 400 if it does not parse, 422 if it
    does not fit."""
    raw = await request.read()
    if not raw.strip() and empty_ok:
        return model()
    if request.content_type != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "send JSON with Content-Type: application/json"
        )
    try:
        document = json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise ApiError(422, "invalid", "invalid request", field_errors(exc)) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError("duplicate key")
        document[key] = value
    return document


def _no_constant(_: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


def _json(
    model: BaseModel, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=model.model_dump_json(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _view(row: Mapping[str, Any]) -> models.Endpoint:
    now = time.time()
    signing = signing_secrets(dict(row), now)
    ends = [entry["expires_at"] for entry in signing if entry.get("expires_at") is not None]
    values = {field: row[field] for field in store.WRITABLE}
    values["url"] = display_url(row["url"])
    values["headers"] = dict.fromkeys(row["headers"] or {}, "****")
    return models.Endpoint(
        **values,
        name=row["name"],
        source="api",
        version=row["version"],
        signing_secrets=len(signing),
        previous_secret_expires_at=_time(max(ends)) if ends else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _config_view(endpoint: EndpointSettings) -> models.Endpoint:
    return models.Endpoint(
        name=endpoint.name,
        url=endpoint.display_url,
        events=list(endpoint.events),
        tenant=endpoint.tenant,
        filter=endpoint.filter_document,
        # Header values may hold credentials of the file's; names only.
        headers=dict.fromkeys(endpoint.headers, "****"),
        timeout_s=endpoint.timeout_s,
        max_in_flight=endpoint.max_in_flight,
        rate_limit_per_s=endpoint.rate_limit_per_s,
        description=endpoint.description,
        metrics_detail=endpoint.metrics_detail,
        paused=endpoint.paused,
        source="config",
        version=None,
        signing_secrets=len(endpoint.signing_keys),
        previous_secret_expires_at=None,
        created_at=None,
        updated_at=None,
    )


def _name(request: web.Request) -> str:
    """The endpoint name in the path; a 404 for anything no endpoint can be called."""
    name = request.match_info["name"]
    if not ENDPOINT_NAME_RE.fullmatch(name):
        raise not_found(name[:100])
    return name


def _unusable(name: str, why: str, errors: list[tuple[str, str]] | None = None) -> ApiError:
    return ApiError(
        409,
        "endpoint_unusable",
        f"{name!r} cannot be used as stored ({why}); PATCH it, or rotate its secret",
        errors,
    )


def _visible(row: dict[str, Any] | None, principal: Principal, name: str) -> dict[str, Any]:
    if row is None or not principal.may_see(row["tenant"]):
        raise not_found(name)
    return row


def _etag(row: Mapping[str, Any], location: str | None = None) -> dict[str, str]:
    headers = {"ETag": f'"{row["version"]}"'}
    if location is not None:
        headers["Location"] = location
    return headers


def _if_match(request: web.Request) -> int | None:
    value = request.headers.get("If-Match")
    if value is None or value.strip() == "*":
        return None
    digits = value.strip().removeprefix("W/").strip('"')
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
        raise ApiError(400, "bad_request", 'If-Match must be an ETag such as "3"')
    return int(digits)


def _name_taken(name: str) -> ApiError:
    return ApiError(409, "name_taken", f"an endpoint named {name!r} exists", [("name", "is taken")])


def _int_query(query: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    text = query.get(key)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or not low <= int(text) <= high:
        raise ApiError(400, "bad_request", f"{key} must be a whole number from {low} to {high}")
    return int(text)


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _cursor(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_request", "cursor is not one this API gave") from None
    if not decoded or "\x00" in decoded:
        raise ApiError(400, "bad_request", "cursor is not one this API gave")
    return decoded


def _time(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=UTC)


async def _quietly(operation: Awaitable[None]) -> None:
    try:
        await operation
    except BrokerUnavailable as exc:
        log.warning("api_compensation_failed", error=str(exc))
