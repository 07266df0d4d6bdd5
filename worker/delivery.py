"""One HTTP attempt: sign, POST, classify. aiohttp errors become outcomes here and only here."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from producer import __version__
from worker.exceptions import BlockedDestination
from worker.netguard import (
    BLOCKED_MESSAGE,
    GuardedResolver,
    check_every_address,
    check_literal_host,
    guarded_socket_factory,
)
from worker.outcomes import AttemptResult, ErrorKind
from worker.settings import MAX_DELAY_S, EndpointSettings, Settings
from worker.signing import signature_header

USER_AGENT = f"Hookline/{__version__}"
RETRY_AFTER_STATUSES = frozenset({429, 503})
LOG_EXCERPT_CHARS = 1024
# Bounds on what an endpoint may send back before its body: status line and each header
# line, and the number of headers.
MAX_RESPONSE_LINE_BYTES = 8190
MAX_RESPONSE_HEADERS = 100
# One detail for every failure to connect or keep a connection: naming the OS error would
# tell whoever sets an endpoint URL whether a port refused, reset or was unreachable.
CONNECTION_FAILED = "connection failed"
# Retry-After longer than this many digits is past MAX_DELAY_S anyway (and int() refuses
# strings of more than 4300 digits).
MAX_RETRY_AFTER_DIGITS = 12
# An endpoint's session (its connection pool) is closed after this long without a new
# attempt, and the worker looks for such sessions this often.
IDLE_CLOSE_S = 300.0
IDLE_SWEEP_S = 60.0


class EndpointClient:
    """The HTTP side of one endpoint: its own connection pool, so a hung endpoint that
    holds every connection it may have cannot take one from any other endpoint.

    The pool (an aiohttp session) is opened at the first attempt and closed by
    :meth:`close_if_idle`: a worker with thousands of endpoints holds pools only for those
    that deliver. ``tls`` is the worker's one context from :func:`client_tls_context`;
    without it the client builds its own. ``resolver`` replaces the system resolver
    underneath the SSRF guard (tests use it to play a rebinding DNS server).
    """

    def __init__(
        self,
        settings: Settings,
        endpoint: EndpointSettings,
        resolver: AbstractResolver | None = None,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.endpoint = endpoint
        # Built once: the host checked below is the host of exactly this URL object.
        self._url = endpoint.request_url
        security = settings.security
        guarded = not security.allow_private_networks
        self._literal_block = False
        try:
            check_literal_host(
                endpoint.host,
                allow_private=security.allow_private_networks,
                allowed_networks=security.allowed_networks,
            )
        except BlockedDestination:
            self._literal_block = True
        proxy = settings.delivery.proxy_url
        # Through a proxy, the connector only ever reaches the (operator-chosen) proxy, so
        # every address of the endpoint's name is checked before each attempt instead.
        self._precheck: AbstractResolver | None = None
        # Resolvers this client created, closed by close() (each session's connector
        # outlives none of them, and one made by the caller is the caller's to close).
        self._owned_resolvers: list[AbstractResolver] = []
        if guarded and proxy is not None:
            if resolver is None:
                resolver = DefaultResolver()
                self._owned_resolvers.append(resolver)
            self._precheck = resolver
        self._allowed_networks = security.allowed_networks
        direct_guard = guarded and proxy is None
        # Kept for every session this client opens; None lets each connector own a default.
        self._connector_resolver: AbstractResolver | None = resolver
        if direct_guard:
            guard = GuardedResolver(allowed_networks=security.allowed_networks, inner=resolver)
            if resolver is None:
                self._owned_resolvers.append(guard)
            self._connector_resolver = guard
        # The address about to be dialled, checked again: IP literals never reach the
        # resolver, so this is the check that cannot be bypassed by a host spelling.
        self._socket_factory = (
            guarded_socket_factory(security.allowed_networks) if direct_guard else None
        )
        # Built here when not given, so that an unreadable ca_bundle fails at start as it
        # always has, not as a connection error at the first attempt.
        self._tls = tls if tls is not None else client_tls_context(settings)
        self._limit = settings.max_in_flight_for(endpoint)
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout_for(endpoint),
            connect=settings.delivery.connect_timeout_s,
        )
        self._headers = {"user-agent": USER_AGENT, **endpoint.headers}
        self._proxy = proxy.get_secret_value() if proxy is not None else None
        self._max_response_bytes = settings.delivery.max_response_bytes
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._running = 0
        self._last_started = 0.0
        # Idle closes under way, awaited by close() even if their sweep was cancelled.
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def has_session(self) -> bool:
        """Whether a session (a connection pool) is open now."""
        return self._session is not None

    async def close(self) -> None:
        """Close for good: a later attempt raises instead of opening a new session."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        await asyncio.gather(*self._closing)
        for resolver in self._owned_resolvers:
            await resolver.close()

    async def close_if_idle(self, idle_s: float) -> bool:
        """Close the session if no attempt is running and none started within ``idle_s``
        seconds; True if one was closed. The next attempt opens a new one."""
        session = self._session
        if session is None or self._running or time.monotonic() - self._last_started < idle_s:
            return False
        # Detached before the first await: an attempt starting while this one closes opens
        # a session of its own instead of picking up the closing one.
        self._session = None
        closing = asyncio.ensure_future(session.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        # Shielded: a sweep cancelled at shutdown must not leave a pool half closed.
        await asyncio.shield(closing)
        return True

    def _open_session(self) -> aiohttp.ClientSession:
        """The open session, or a new one. No await in here: concurrent first attempts
        cannot interleave between the check and the creation, so they share one pool."""
        if self._closed:
            # The same type aiohttp raises for a closed session, and as that, not a delivery
            # failure: classify_error lets it through as Hookline's own error.
            raise RuntimeError("endpoint client is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                resolver=self._connector_resolver,
                socket_factory=self._socket_factory,
                ssl=self._tls,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers=self._headers,
                auto_decompress=False,
                # Cookies an endpoint sets are neither kept nor sent back with later
                # deliveries.
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept-Encoding",),
                proxy=self._proxy,
                max_line_size=MAX_RESPONSE_LINE_BYTES,
                max_field_size=MAX_RESPONSE_LINE_BYTES,
                max_headers=MAX_RESPONSE_HEADERS,
            )
        return self._session

    async def attempt(self, event_id: str, body: bytes) -> AttemptResult:
        """POST ``body`` once, signed for this moment; never raises for delivery failures.
        After :meth:`close` it raises RuntimeError, as a closed aiohttp session does."""
        if self._literal_block:
            return AttemptResult(error=ErrorKind.BLOCKED_DESTINATION, detail=BLOCKED_MESSAGE)
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(
                self.endpoint.signing_keys, event_id, timestamp, body
            ),
        }
        started = time.perf_counter()
        self._running += 1
        self._last_started = time.monotonic()
        try:
            if self._precheck is not None:
                await check_every_address(
                    self._precheck, self.endpoint.host, allowed_networks=self._allowed_networks
                )
            async with self._open_session().post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as response:
                excerpt = await self._read_excerpt(response)
                status = response.status
                retry_after = (
                    parse_retry_after(response.headers.get("retry-after"))
                    if status in RETRY_AFTER_STATUSES
                    else None
                )
        except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome, below
            error, detail = classify_error(exc)
            return AttemptResult(
                error=error, detail=detail, duration_s=time.perf_counter() - started
            )
        finally:
            self._running -= 1
        return AttemptResult(
            status=status,
            detail=excerpt,
            retry_after_s=retry_after,
            duration_s=time.perf_counter() - started,
        )

    async def _read_excerpt(self, response: aiohttp.ClientResponse) -> str:
        """Read at most ``max_response_bytes``: an endpoint must not make us buffer gigabytes."""
        if 200 <= response.status < 300 or self._max_response_bytes == 0:
            return ""
        chunks: list[bytes] = []
        remaining = self._max_response_bytes
        while remaining > 0:
            chunk = await response.content.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks).decode("utf-8", "replace")[:LOG_EXCERPT_CHARS]


def client_tls_context(settings: Settings) -> ssl.SSLContext:
    """The context every client of a worker shares: build it once and pass it to each
    ``EndpointClient(tls=...)``. Each one holds a parsed copy of the CA store (most of a
    megabyte), too much to keep per endpoint."""
    return tls_context(settings.security.ca_bundle)


def tls_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """The system's trusted CAs, plus those of ``security.ca_bundle``: a private CA is
    trusted in addition to the public ones, never instead of them."""
    context = ssl.create_default_context()
    if ca_bundle is not None:
        context.load_verify_locations(cafile=ca_bundle)
    return context


def classify_error(exc: BaseException) -> tuple[ErrorKind, str]:
    """The one translation of aiohttp's exceptions into Hookline's error classes.

    Details are fixed strings: they end up in dead letters and logs that the endpoint's
    owner may see, and must not describe the network beyond the endpoint.
    """
    if isinstance(exc, BlockedDestination) or (
        isinstance(exc, aiohttp.ClientConnectorError)
        and isinstance(exc.os_error, BlockedDestination)
    ):
        return ErrorKind.BLOCKED_DESTINATION, BLOCKED_MESSAGE
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return ErrorKind.TIMEOUT, "no response within the timeout"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return ErrorKind.TLS_ERROR, exc.__class__.__name__
    if isinstance(exc, aiohttp.ClientConnectorDNSError | socket.gaierror):
        return ErrorKind.DNS_ERROR, "host name did not resolve"
    if isinstance(exc, aiohttp.ClientResponseError):
        return ErrorKind.PROTOCOL_ERROR, exc.__class__.__name__
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ErrorKind.CONNECTION_ERROR, CONNECTION_FAILED
    if isinstance(exc, ValueError):
        return ErrorKind.PROTOCOL_ERROR, exc.__class__.__name__
    raise exc


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date), at most
    ``MAX_DELAY_S``; None for anything else. The endpoint writes this header, so no value
    may raise."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        digits = value.lstrip("0") or "0"
        if len(digits) > MAX_RETRY_AFTER_DIGITS:
            return float(MAX_DELAY_S)
        return float(min(int(digits), MAX_DELAY_S))
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        year, month, day, hour, minute, second = parsed[:6]
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
        # The zone offset applied in seconds: as a datetime it could leave years 1-9999.
        seconds = (moment - datetime.now(UTC)).total_seconds() - (parsed[9] or 0)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, seconds), float(MAX_DELAY_S))
