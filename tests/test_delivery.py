"""One HTTP attempt against real loopback servers: headers, bounds and error classes."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks.webhooks import Webhook

from tests.conftest import SECRET_A, Receiver, endpoint, make_settings
from worker.delivery import EndpointClient, parse_retry_after
from worker.outcomes import AttemptResult
from worker.settings import Settings


def client_for(url: str, **extra: object) -> EndpointClient:
    settings = make_settings("unused", [endpoint("ep", url, ["#"], **extra)])
    return EndpointClient(settings, settings.endpoints[0])


async def attempt_once(settings: Settings, event_id: str, body: bytes = b"{}") -> AttemptResult:
    """One attempt by a fresh client for the first endpoint of ``settings``."""
    client = EndpointClient(settings, settings.endpoints[0])
    try:
        return await client.attempt(event_id, body)
    finally:
        await client.close()


@pytest.fixture
def private_ca() -> tuple[trustme.CA, ssl.SSLContext]:
    """A private CA and a server context presenting its certificate for 127.0.0.1."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    return authority, context


async def ok(_: web.Request) -> web.Response:
    return web.Response()


async def test_attempt_posts_signed_body_with_contract_headers(receiver: Receiver) -> None:
    """POST with the exact body and the Standard Webhooks headers; 2xx is delivered."""
    client = client_for(receiver.url("/in"), headers={"Authorization": "Bearer t"})
    try:
        result = await client.attempt("evt-1", b'{"id":"evt-1"}')
    finally:
        await client.close()
    assert result.delivered and result.status == 200
    [request] = receiver.requests
    assert request.body == b'{"id":"evt-1"}'
    assert request.headers["Authorization"] == "Bearer t"
    assert request.headers["Content-Type"] == "application/json"
    Webhook(SECRET_A).verify(request.body, request.headers)


async def test_large_error_response_is_read_only_up_to_the_bound() -> None:
    """An endpoint answering a huge error body is read at most max_response_bytes."""
    served = asyncio.Event()

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=500)
        await response.prepare(request)
        for _ in range(64):  # 64 MiB if anyone read it all
            await response.write(b"E" * 1_048_576)
        served.set()
        return response

    async with serve(huge) as url:
        client = client_for(url)
        try:
            result = await client.attempt("evt-2", b"{}")
        finally:
            await client.close()
    assert result.status == 500
    assert result.detail == "E" * 1024  # the log excerpt


async def test_transport_errors_are_classified() -> None:
    """Refused connections and timeouts become error classes, not exceptions."""
    refused = client_for("http://127.0.0.1:9/")

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    async with serve(slow) as url:
        timing_out = client_for(url, timeout_s=0.2)
        try:
            started = time.monotonic()
            timeout_result = await timing_out.attempt("evt-3", b"{}")
            assert time.monotonic() - started < 2
        finally:
            await timing_out.close()
    try:
        refused_result = await refused.attempt("evt-3", b"{}")
    finally:
        await refused.close()
    assert (timeout_result.error, timeout_result.last_status) == ("timeout", "timeout")
    assert refused_result.error == "connection_error"
    assert refused_result.status_class == "connection_error"


async def test_untrusted_certificate_is_a_tls_error(
    private_ca: tuple[trustme.CA, ssl.SSLContext],
) -> None:
    """Certificates are always verified: an endpoint signed by an unknown CA is a tls_error."""
    async with serve(ok, ssl_context=private_ca[1]) as url:
        settings = make_settings(
            "unused",
            [endpoint("tls", url, ["#"])],
            security={"require_https": True, "allow_private_networks": True},
        )
        result = await attempt_once(settings, "evt-4")
    assert result.error == "tls_error"


def test_retry_after_parsing() -> None:
    """Retry-After is read as delta-seconds or an HTTP date; junk is ignored."""
    assert parse_retry_after("120") == 120
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    future = datetime.now(UTC) + timedelta(seconds=90)
    parsed = parse_retry_after(email.utils.format_datetime(future, usegmt=True))
    assert parsed is not None and 85 <= parsed <= 91
    past = email.utils.format_datetime(datetime.now(UTC) - timedelta(days=1), usegmt=True)
    assert parse_retry_after(past) == 0


class serve:  # noqa: N801 - used as `async with serve(handler) as url`
    """A one-route aiohttp server on 127.0.0.1 for a single test."""

    def __init__(
        self, handler: object, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> None:
        self._handler = handler
        self._ssl = ssl_context
        self._host = host
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handler)  # type: ignore[arg-type]
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, 0, ssl_context=self._ssl)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"{'https' if self._ssl else 'http'}://{host}:{port}/hook"

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


class SequenceResolver(AbstractResolver):
    """A DNS server that answers each lookup with the next list of addresses."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answer = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
            for a in answer
        ]

    async def close(self) -> None:
        return None


async def test_dns_rebinding_is_refused_at_connect_time() -> None:
    """A name that first resolves to an allowed address and then to a private one: the first
    delivery reaches the allowed address only, the next is refused without any connection."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.transport.get_extra_info("sockname")[0])  # type: ignore[union-attr]
        return web.Response()

    async with serve(record, host="127.0.0.2") as allowed_url, serve(record) as _:
        port = allowed_url.rsplit(":", 1)[1].split("/")[0]
        settings = make_settings(
            "unused",
            [endpoint("rebind", f"http://rebind.example:{port}/hook", ["#"])],
            security={"allow_private_networks": False, "allowed_networks": ["127.0.0.2/32"]},
        )
        dns = SequenceResolver(["127.0.0.1", "127.0.0.2"], ["127.0.0.1"])
        first = EndpointClient(settings, settings.endpoints[0], resolver=dns)
        second = EndpointClient(settings, settings.endpoints[0], resolver=dns)
        try:
            delivered = await first.attempt("evt-r1", b"{}")
            refused = await second.attempt("evt-r2", b"{}")
        finally:
            await first.close()
            await second.close()
    assert delivered.status == 200
    assert hits == ["127.0.0.2"]  # never the private address listed first
    assert refused.error == "blocked_destination"
    assert dns.lookups == 2


async def test_deliveries_go_through_the_configured_proxy() -> None:
    """With delivery.proxy_url every request goes to the proxy, in absolute form."""
    seen: list[bytes] = []

    async def fake_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(fake_proxy, "127.0.0.1", 0)
    proxy_port = server.sockets[0].getsockname()[1]
    settings = make_settings(
        "unused",
        [endpoint("via", "http://127.0.0.1:9/hook", ["#"])],
        delivery={"proxy_url": f"http://127.0.0.1:{proxy_port}"},
    )
    try:
        result = await attempt_once(settings, "evt-p1")
    finally:
        server.close()
    assert result.status == 204
    assert seen[0].startswith(b"POST http://127.0.0.1:9/hook HTTP/1.1")
    assert b"webhook-signature: v1," in seen[0].lower()


async def test_private_ca_bundle_is_trusted(
    tmp_path: Path, private_ca: tuple[trustme.CA, ssl.SSLContext]
) -> None:
    """security.ca_bundle lets Hookline verify endpoints signed by a private CA."""
    authority, context = private_ca
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    async with serve(ok, ssl_context=context) as url:
        settings = make_settings(
            "unused",
            [endpoint("tls", url, ["#"])],
            security={"require_https": True, "allow_private_networks": True,
                      "ca_bundle": str(bundle)},
        )  # fmt: skip
        result = await attempt_once(settings, "evt-5")
    assert result.status == 200


async def test_oversized_response_headers_are_a_failed_attempt() -> None:
    """An endpoint answering with a 64 KiB header line is refused, not buffered."""

    async def huge_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(huge_header, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = client_for(f"http://127.0.0.1:{port}/hook")
    try:
        result = await client.attempt("evt-6", b"{}")
    finally:
        await client.close()
        server.close()
    assert not result.delivered
    assert result.error in ("protocol_error", "connection_error")
