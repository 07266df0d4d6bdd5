"""One HTTP attempt: sign, POST, classify. aiohttp errors become outcomes here and only here."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import ssl
import time
from datetime import UTC, datetime

import aiohttp
from aiohttp.abc import AbstractResolver

from producer import __version__
from worker.exceptions import BlockedDestination
from worker.netguard import GuardedResolver, check_literal_host
from worker.outcomes import AttemptResult, ErrorKind
from worker.settings import EndpointSettings, Settings
from worker.signing import signature_header

USER_AGENT = f"Hookline/{__version__}"
RETRY_AFTER_STATUSES = frozenset({429, 503})
LOG_EXCERPT_CHARS = 1024
# Bounds on what an endpoint may send back before its body: status line and each header
# line, and the number of headers.
MAX_RESPONSE_LINE_BYTES = 8190
MAX_RESPONSE_HEADERS = 100


class EndpointClient:
    """The HTTP side of one endpoint: its own connection pool, so a hung endpoint that
    holds every connection it may have cannot take one from any other endpoint.

    ``resolver`` replaces the system resolver underneath the SSRF guard (tests use it to
    play a rebinding DNS server).
    """

    def __init__(
        self,
        settings: Settings,
        endpoint: EndpointSettings,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.endpoint = endpoint
        security = settings.security
        self._literal_block: str | None = None
        try:
            check_literal_host(
                endpoint.host,
                allow_private=security.allow_private_networks,
                allowed_networks=security.allowed_networks,
            )
        except BlockedDestination as exc:
            self._literal_block = str(exc)
        guard = (
            None
            if security.allow_private_networks
            else GuardedResolver(allowed_networks=security.allowed_networks, inner=resolver)
        )
        proxy = settings.delivery.proxy_url
        # Through a proxy, the connector only ever reaches the (operator-chosen) proxy, so
        # the guard checks the endpoint's name itself before each attempt instead.
        self._precheck = guard if proxy is not None else None
        connector = aiohttp.TCPConnector(
            limit=settings.max_in_flight_for(endpoint),
            resolver=guard if proxy is None else resolver,
            ssl=ssl.create_default_context(cafile=security.ca_bundle),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=settings.timeout_for(endpoint),
                connect=settings.delivery.connect_timeout_s,
            ),
            headers={"user-agent": USER_AGENT, **endpoint.headers},
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            proxy=proxy.get_secret_value() if proxy is not None else None,
            max_line_size=MAX_RESPONSE_LINE_BYTES,
            max_field_size=MAX_RESPONSE_LINE_BYTES,
            max_headers=MAX_RESPONSE_HEADERS,
        )
        self._max_response_bytes = settings.delivery.max_response_bytes

    async def close(self) -> None:
        await self._session.close()

    async def attempt(self, event_id: str, body: bytes) -> AttemptResult:
        """POST ``body`` once, signed for this moment; never raises for delivery failures."""
        if self._literal_block is not None:
            return AttemptResult(error=ErrorKind.BLOCKED_DESTINATION, detail=self._literal_block)
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
        try:
            if self._precheck is not None:
                await self._precheck.resolve(self.endpoint.host, 0, socket.AF_UNSPEC)
            async with self._session.post(
                self.endpoint.url, data=body, headers=headers, allow_redirects=False
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


def classify_error(exc: BaseException) -> tuple[ErrorKind, str]:
    """The one translation of aiohttp's exceptions into Hookline's error classes."""
    if isinstance(exc, BlockedDestination):
        return ErrorKind.BLOCKED_DESTINATION, str(exc)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return ErrorKind.TIMEOUT, "no response within the timeout"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return ErrorKind.TLS_ERROR, exc.__class__.__name__
    if isinstance(exc, aiohttp.ClientConnectorDNSError | socket.gaierror):
        return ErrorKind.DNS_ERROR, "host name did not resolve"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ErrorKind.CONNECTION_ERROR, f"cannot connect: {exc.os_error.__class__.__name__}"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return ErrorKind.CONNECTION_ERROR, exc.__class__.__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        return ErrorKind.PROTOCOL_ERROR, exc.__class__.__name__
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ErrorKind.CONNECTION_ERROR, exc.__class__.__name__
    if isinstance(exc, ValueError):
        return ErrorKind.PROTOCOL_ERROR, exc.__class__.__name__
    raise exc


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())
