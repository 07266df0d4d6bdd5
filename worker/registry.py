"""The endpoint registry as a worker sees it: endpoints kept in PostgreSQL by the API.

The delivery path never touches the database. This module keeps an in-memory copy of the
registry's endpoints and tells the worker when it changed; the worker applies the change
like a config reload (:mod:`worker.reload`).

How changes arrive, fastest first:

- every committed write to the ``endpoints`` table sends a PostgreSQL notification (a
  trigger, so a change made with plain SQL counts too) naming the endpoint; the worker
  re-reads that row. Notifications are transactional: sent at commit, never for a
  rolled-back change, so nothing is applied before the API has answered;
- every ``registry.reconcile_s`` the whole table is read again: a notification missed
  while the listening connection was down heals there;
- a rotated secret's grace period ends on a timer, after which only the new key signs.

With the database away, the worker keeps delivering with the set it has, retries with
backoff, says so in ``/readyz`` and ``webhook_registry_connected``, and reads everything
again once it is back. ``registry.snapshot_path`` keeps the last set read (secrets still
sealed), so a worker that starts while the database is down starts with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from pydantic import ValidationError

from worker.exceptions import RegistryUnavailable, SecretUnreadable
from worker.metrics import Metrics
from worker.secretbox import SecretBox
from worker.settings import EndpointSettings, Settings

# The columns a worker reads (written out: no query is assembled from strings).
SELECT_ENDPOINTS = (
    "SELECT name, tenant, url, events, filter, headers, timeout_s, max_in_flight,"
    " rate_limit_per_s, description, metrics_detail, paused, secrets, version FROM endpoints"
)
SELECT_NAMED_ENDPOINTS = (
    "SELECT name, tenant, url, events, filter, headers, timeout_s, max_in_flight,"
    " rate_limit_per_s, description, metrics_detail, paused, secrets, version FROM endpoints"
    " WHERE name = ANY($1::text[])"
)
# Optional fields a row leaves out when NULL (the model's defaults apply).
OPTIONAL_FIELDS = (
    "tenant",
    "filter",
    "timeout_s",
    "max_in_flight",
    "rate_limit_per_s",
    "description",
)
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 30.0
# Several notifications within this window are read together.
NOTIFY_BATCH_S = 0.005
# A quiet connection is asked "SELECT 1" this often; every query has this bound.
PING_S = 10.0
QUERY_TIMEOUT_S = 15.0
# /readyz names this many endpoints whose rows the worker cannot use, at most.
LISTED_INVALID = 20

log = structlog.get_logger("hookline.registry")

Row = dict[str, Any]


def channel_name(schema: str) -> str:
    """The notification channel of the registry in ``schema`` (see the migration)."""
    return f"hookline_endpoints_{schema}"


async def init_connection(connection: asyncpg.Connection) -> None:
    """jsonb as Python values, both ways."""
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


async def connect(settings: Settings) -> asyncpg.Connection:
    """One connection to the registry, or :class:`RegistryUnavailable` (never the URL)."""
    assert settings.registry.database_url is not None
    try:
        connection = await asyncpg.connect(
            settings.registry.database_url.get_secret_value(),
            timeout=settings.registry.connect_timeout_s,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise RegistryUnavailable(f"cannot reach the registry database: {_describe(exc)}") from None
    try:
        await init_connection(connection)
    except BaseException:
        await connection.close(timeout=1)
        raise
    return connection


def endpoint_from_row(row: Row, box: SecretBox, now: float) -> EndpointSettings:
    """The endpoint a registry row describes, with the secrets that sign at ``now``.
    Raises :class:`ValueError` (a ValidationError) or :class:`SecretUnreadable`."""
    document: dict[str, Any] = {
        "name": row["name"],
        "url": row["url"],
        "events": tuple(row["events"]),
        "headers": open_headers(box, row["name"], row["headers"] or {}),
        "metrics_detail": row["metrics_detail"],
        "paused": row["paused"],
        "secret": tuple(
            box.open(entry["sealed"], row["name"]) for entry in signing_secrets(row, now)
        ),
    }
    for field in OPTIONAL_FIELDS:
        if row[field] is not None:
            document[field] = row[field]
    endpoint = EndpointSettings.model_validate(document, context={"environ": {}})
    return endpoint.mark_from_registry()


def open_headers(box: SecretBox, endpoint: str, sealed: Mapping[str, str]) -> dict[str, str]:
    try:
        return {
            header: box.open(value, header_context(endpoint, header))
            for header, value in sealed.items()
        }
    except SecretUnreadable as exc:
        raise SecretUnreadable(f"a stored header value: {exc}") from None


def header_context(endpoint: str, header: str) -> str:
    """What a sealed header value is bound to: its endpoint and its name."""
    return f"{endpoint}/headers/{header}"


def signing_secrets(row: Row, now: float) -> list[dict[str, Any]]:
    """The row's secrets whose grace period has not ended, newest first."""
    return [
        entry
        for entry in row["secrets"]
        if entry.get("expires_at") is None or entry["expires_at"] > now
    ]


def next_expiry(row: Row, now: float) -> float | None:
    """When the row's set of signing secrets changes next, if it does."""
    ends = [
        entry["expires_at"]
        for entry in row["secrets"]
        if entry.get("expires_at") is not None and entry["expires_at"] > now
    ]
    return min(ends, default=None)


class Registry:
    """The registry's endpoints, kept current in the background."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        on_change: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._gauges = metrics.registry_gauges()
        self._on_change = on_change
        self._box = SecretBox.from_setting(settings.registry.secret_key)
        self._rows: dict[str, Row] = {}
        self._endpoints: dict[str, EndpointSettings] = {}
        self._expiries: dict[str, float] = {}
        self._notified: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        # Rows this worker cannot use (logged once per version, counted in /readyz).
        self._invalid: set[str] = set()
        self._snapshot_dirty = False
        self._snapshot_written: float | None = None
        self.connected = False
        self.unavailable_since: float | None = None
        self.last_sync: float | None = None
        self.last_error: str | None = None

    @property
    def endpoints(self) -> list[EndpointSettings]:
        return [self._endpoints[name] for name in sorted(self._endpoints)]

    def detail(self) -> dict[str, Any]:
        """For ``/readyz``: whether the registry is reachable, and since when not."""
        detail: dict[str, Any] = {
            "connected": self.connected,
            "endpoints": len(self._endpoints),
            "invalid_endpoints": sorted(self._invalid)[:LISTED_INVALID],
        }
        if self.last_sync is not None:
            detail["last_sync_age_s"] = round(time.time() - self.last_sync, 1)
        if not self.connected:
            detail["unavailable_since"] = self.unavailable_since
            detail["error"] = self.last_error
        return detail

    async def start(self) -> None:
        """A first full read (bounded by ``registry.connect_timeout_s``), or the snapshot
        if the database cannot be read; then keeps current in the background."""
        try:
            connection = await connect(self._settings)
            try:
                await self._read_all(connection)
            finally:
                await connection.close(timeout=1)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the worker starts
            self._unavailable(exc)
            snapshot = self._load_snapshot()
            log.warning(
                "registry_unavailable_at_start",
                error=self.last_error,
                endpoints_from_snapshot=snapshot,
                hint="delivering to the config file's endpoints"
                + (" and the last snapshot's" if snapshot else "")
                + " until the database answers",
            )
        self._task = asyncio.create_task(self._run(), name="registry-sync")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._snapshot_dirty:
            await self._save_snapshot()  # what the next start falls back on
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close(timeout=1)
            self._connection = None

    async def _run(self) -> None:
        delay_s = RETRY_FIRST_DELAY_S
        while True:
            try:
                await self._listen_and_sync()
            except Exception as exc:
                self._unavailable(exc)
                log.warning(
                    "registry_unavailable",
                    error=self.last_error,
                    retry_in_s=round(delay_s, 2),
                    endpoints_kept=len(self._endpoints),
                    exc_info=None if isinstance(exc, REGISTRY_DOWN) else exc,
                )
                await self._wait_away(delay_s)
                delay_s = min(delay_s * 2, RETRY_MAX_DELAY_S) * random.uniform(0.8, 1.0)  # noqa: S311
            else:
                delay_s = RETRY_FIRST_DELAY_S

    async def _wait_away(self, delay_s: float) -> None:
        """Wait out a retry delay, ending secrets' grace periods on time meanwhile: with
        the database away, the rows kept are the truth there is."""
        deadline = time.monotonic() + delay_s
        while (left_s := deadline - time.monotonic()) > 0:
            if self._expiries:
                left_s = min(left_s, max(0.0, min(self._expiries.values()) - time.time()))
            await asyncio.sleep(left_s)
            due = {name for name, at in self._expiries.items() if at <= time.time()}
            if due:
                self._apply({name: self._rows[name] for name in due}, names=due)

    async def _listen_and_sync(self) -> None:
        """Until the connection is lost: listen, read everything, then follow changes."""
        connection = await connect(self._settings)
        self._connection = connection
        self._lost.clear()
        try:
            schema = await connection.fetchval("SELECT current_schema()")
            channel = channel_name(schema)
            connection.add_termination_listener(lambda _: self._lost_connection())
            await connection.add_listener(channel, self._notified_of)
            # After listening, so that no change between the read and the listen is missed.
            await self._read_all(connection)
            if not self.connected:
                log.info("registry_connected", endpoints=len(self._endpoints))
            self.connected = True
            self.unavailable_since = None
            self._gauges.connected.set(1)
            await self._follow(connection)
        finally:
            self._connection = None
            with contextlib.suppress(Exception):
                await connection.close(timeout=1)

    async def _follow(self, connection: asyncpg.Connection) -> None:
        next_reconcile = time.monotonic() + self._settings.registry.reconcile_s
        while True:
            wait_s = min(next_reconcile - time.monotonic(), PING_S)
            if self._expiries:
                wait_s = min(wait_s, min(self._expiries.values()) - time.time())
            if not self._notified and not self._lost.is_set():
                # Cleared only with nothing pending: a notification that arrived while
                # the last batch was read is not left waiting for the next reconcile.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, wait_s))
            if self._lost.is_set() or connection.is_closed():
                raise RegistryUnavailable("the registry connection was lost")
            if not self._notified:
                # A connection a NAT or a failover left half-open delivers no notification
                # and no error: ask it something, within a bound.
                await connection.fetchval("SELECT 1", timeout=QUERY_TIMEOUT_S)
            if self._snapshot_due():
                await self._save_snapshot()
            if time.monotonic() >= next_reconcile:
                await self._read_all(connection)
                next_reconcile = time.monotonic() + self._settings.registry.reconcile_s
                continue
            await asyncio.sleep(NOTIFY_BATCH_S)
            names, self._notified = self._notified, set()
            names |= {name for name, at in self._expiries.items() if at <= time.time()}
            if names:
                await self._read_some(connection, names)

    def _notified_of(self, _connection: Any, _pid: int, _channel: str, payload: object) -> None:
        self._notified.add(str(payload))
        self._wake.set()

    def _lost_connection(self) -> None:
        self._lost.set()
        self._wake.set()

    def _unavailable(self, exc: BaseException) -> None:
        if self.connected or self.unavailable_since is None:
            self.unavailable_since = time.time()
        self.connected = False
        self.last_error = _describe(exc)
        self._gauges.connected.set(0)

    async def _read_all(self, connection: asyncpg.Connection) -> None:
        await self._read(connection, None)
        if self._snapshot_written is None:
            await self._save_snapshot()

    async def _read_some(self, connection: asyncpg.Connection, names: set[str]) -> None:
        await self._read(connection, names)

    async def _read(self, connection: asyncpg.Connection, names: set[str] | None) -> None:
        """Every row, or those of ``names`` (a name with no row is a deleted endpoint)."""
        if names is None:
            rows = await connection.fetch(SELECT_ENDPOINTS, timeout=QUERY_TIMEOUT_S)
        else:
            rows = await connection.fetch(
                SELECT_NAMED_ENDPOINTS, list(names), timeout=QUERY_TIMEOUT_S
            )
        self._snapshot_dirty |= self._apply({row["name"]: dict(row) for row in rows}, names)
        self.last_sync = time.time()
        self._gauges.last_sync.set(self.last_sync)

    def _apply(self, fresh: Mapping[str, Row], names: set[str] | None) -> bool:
        """Take the rows read (all of them, or those of ``names``); True if the endpoint set
        changed, and then the worker is told."""
        now = time.time()
        scope = set(self._rows) | set(fresh) if names is None else names
        changed = False
        for name in scope:
            row = fresh.get(name)
            expired = name in self._expiries and self._expiries[name] <= now
            if row is None:
                self._rows.pop(name, None)
                self._expiries.pop(name, None)
                self._invalid.discard(name)
                changed |= self._endpoints.pop(name, None) is not None
                continue
            if self._rows.get(name) == row and not expired:
                continue
            self._rows[name] = row
            self._expiries.pop(name, None)
            try:
                ends = next_expiry(row, now)
                endpoint = endpoint_from_row(row, self._box, now)
                problems = self._settings.endpoint_problems(endpoint)
                if problems:
                    raise ValueError("; ".join(f"{field}: {text}" for field, text in problems))
            except Exception as exc:  # noqa: BLE001 - a row written by hand can be anything
                # Not delivered until the row is fixed (its events wait in its queue): the
                # row may be a new URL or a revoked secret, so the last good version is no
                # longer the truth.
                log.error("registry_endpoint_invalid", endpoint=name, error=_validation(exc))
                self._invalid.add(name)
                changed |= self._endpoints.pop(name, None) is not None
                continue
            self._invalid.discard(name)
            if ends is not None:
                self._expiries[name] = ends
            if self._endpoints.get(name) != endpoint:
                self._endpoints[name] = endpoint
                changed = True
        self._gauges.endpoints.set(len(self._endpoints))
        self._gauges.invalid.set(len(self._invalid))
        if changed:
            self._on_change()
        return changed

    def _snapshot_due(self) -> bool:
        """At most once per ``reconcile_s``: encoding 10,000 rows holds the event loop for
        a few hundred milliseconds."""
        written = self._snapshot_written
        return self._snapshot_dirty and (
            written is None or time.monotonic() - written >= self._settings.registry.reconcile_s
        )

    async def _save_snapshot(self) -> None:
        path = self._settings.registry.snapshot_path
        self._snapshot_dirty = False
        self._snapshot_written = time.monotonic()
        if path is None:
            return
        document = {"written_at": time.time(), "rows": list(self._rows.values())}
        try:
            await asyncio.to_thread(_write_atomically, path, document)
        except OSError as exc:
            log.warning("registry_snapshot_not_written", error=exc.__class__.__name__)

    def _load_snapshot(self) -> int:
        path = self._settings.registry.snapshot_path
        if path is None or not path.exists():
            return 0
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
            rows = {row["name"]: row for row in document["rows"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("registry_snapshot_unreadable", error=exc.__class__.__name__)
            return 0
        self._apply(rows, names=None)
        return len(self._endpoints)


def _write_atomically(path: Path, document: dict[str, Any]) -> None:
    """Secrets stay sealed in it; still, only the worker's user may read it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        json.dump(document, file)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)


# What a lost or refused database connection raises once it was open.
PG_GONE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.UndefinedTableError,
)
# What ends a sync attempt: the database cannot be reached, or the connection went away.
REGISTRY_DOWN: tuple[type[BaseException], ...] = (RegistryUnavailable, *PG_GONE)
# Any failure of a query, the database's own refusals included.
DATABASE_FAILURES: tuple[type[BaseException], ...] = (*PG_GONE, asyncpg.PostgresError)


def _describe(exc: BaseException) -> str:
    """An error fit for a log line: its class, and a PostgreSQL message (never a URL)."""
    if isinstance(exc, RegistryUnavailable):
        return str(exc)
    if isinstance(exc, asyncpg.PostgresError):
        return f"{exc.__class__.__name__}: {exc.args[0] if exc.args else ''}".rstrip(": ")
    return exc.__class__.__name__


def _validation(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        )
    return str(exc)


async def with_registry_endpoints(settings: Settings) -> Settings:
    """``settings`` with the registry's endpoints added, read once (for the one-shot
    commands: ``dlq replay``, ``send-test``, ``status``). Raises
    :class:`RegistryUnavailable` if the database cannot be read."""
    if not settings.registry.enabled:
        return settings
    box = SecretBox.from_setting(settings.registry.secret_key)
    connection = await connect(settings)
    try:
        rows = await connection.fetch(SELECT_ENDPOINTS)
    except DATABASE_FAILURES as exc:
        raise RegistryUnavailable(f"cannot read the registry: {_describe(exc)}") from None
    finally:
        await connection.close(timeout=1)
    taken = {endpoint.name for endpoint in settings.endpoints}
    now = time.time()
    extra = []
    for row in rows:
        if row["name"] in taken:
            continue
        try:
            extra.append(endpoint_from_row(dict(row), box, now))
        except (ValueError, SecretUnreadable) as exc:
            log.warning("registry_endpoint_invalid", endpoint=row["name"], error=_validation(exc))
    return settings.model_copy(update={"endpoints": (*settings.endpoints, *extra)})
