"""One HTTP attempt against real loopback servers: headers, bounds and error classes."""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
from datetime import UTC, datetime, timedelta

import trustme
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from tests.conftest import SECRET_A, Receiver, endpoint, make_settings
from worker.delivery import EndpointClient, parse_retry_after


def client_for(url: str, **extra: object) -> EndpointClient:
    settings = make_settings("unused", [endpoint("ep", url, ["#"], **extra)])
    return EndpointClient(settings, settings.endpoints[0])


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


async def test_untrusted_certificate_is_a_tls_error() -> None:
    """Certificates are always verified: a self-signed endpoint fails with tls_error."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)

    async def ok(_: web.Request) -> web.Response:
        return web.Response()

    async with serve(ok, ssl_context=context) as url:
        settings = make_settings(
            "unused",
            [endpoint("tls", url, ["#"])],
            security={"require_https": True, "allow_private_networks": True},
        )
        client = EndpointClient(settings, settings.endpoints[0])
        try:
            result = await client.attempt("evt-4", b"{}")
        finally:
            await client.close()
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

    def __init__(self, handler: object, ssl_context: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handler)  # type: ignore[arg-type]
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"{'https' if self._ssl else 'http'}://{host}:{port}/hook"

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
