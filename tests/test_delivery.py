"""One HTTP attempt against real loopback servers: headers, bounds and error classes."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import ssl
import struct
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from tests.conftest import (
    SECRET_A,
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_settings,
    publish_events,
)
from tests.helpers import RecordingResolver
from worker.delivery import EndpointClient, client_tls_context, parse_retry_after
from worker.netguard import BLOCKED_MESSAGE
from worker.outcomes import AttemptResult
from worker.sendtest import run_send_test
from worker.settings import MAX_DELAY_S, Settings
from worker.topology import dead_letter_queue


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


def trusting(
    private_ca: tuple[trustme.CA, ssl.SSLContext], tmp_path: Path, endpoints: list[dict[str, Any]]
) -> Settings:
    """Settings for ``endpoints`` over https with the private CA as security.ca_bundle."""
    bundle = tmp_path / "ca.pem"
    private_ca[0].cert_pem.write_to_path(str(bundle))
    return make_settings(
        "unused",
        endpoints,
        security={"require_https": True, "allow_private_networks": True, "ca_bundle": str(bundle)},
    )


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
    async with serve(ok, ssl_context=private_ca[1]) as url:
        settings = trusting(private_ca, tmp_path, [endpoint("tls", url, ["#"])])
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


# Spellings of loopback that yarl (and so aiohttp) turns into the literal 127.0.0.1 or 127.1.
LOOPBACK_SPELLINGS = (
    "\u2460\u2461\u2466.0.0.1",  # circled digits
    "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # fullwidth digits
    "127\u30020\u30020\u30021",  # ideographic full stops
    "127\uff0e0\uff0e0\uff0e1",  # fullwidth full stops
)


def with_unchecked_urls(settings: Settings, urls: dict[str, str]) -> Settings:
    """``settings`` with endpoint URLs replaced without validation: what the delivery path
    does if a URL ever got past the config checks."""
    endpoints = tuple(
        ep.model_copy(update={"url": urls[ep.name]}) if ep.name in urls else ep
        for ep in settings.endpoints
    )
    return settings.model_copy(update={"endpoints": endpoints})


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def test_worker_never_dials_a_host_that_normalises_to_loopback(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """A real worker with default security: endpoints whose hosts become 127.0.0.1 only once
    normalised (had they got past config load), an ASCII loopback literal and a name that
    becomes 'localhost' never reach the listening receiver. Each is dead-lettered as
    blocked_destination with one detail, whether its port is open or closed."""
    port = port_of(receiver.base_url)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    urls = {
        f"idn{index}": f"http://{host}:{port}/x" for index, host in enumerate(LOOPBACK_SPELLINGS)
    }
    urls["short"] = f"http://\u2460\u2461\u2466.\u2460:{port}/x"  # becomes 127.1
    urls["closed"] = f"http://\u2460\u2461\u2466.0.0.1:{closed_port}/x"
    urls["ascii"] = f"http://127.0.0.1:{port}/x"
    urls["named"] = f"http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{port}/x"
    settings = make_settings(
        exchange_name,
        [endpoint(name, "http://placeholder.example/", ["s.*"]) for name in urls],
        security={"allow_private_networks": False},
    )
    await run_worker(with_unchecked_urls(settings, urls))
    await publish_events(exchange_name, 1, "s.x", "evt")
    queue = dead_letter_queue(exchange_name)

    async def all_dead_lettered() -> bool:
        return await broker.depth(queue) == len(urls)

    await eventually(all_dead_lettered)
    letters = await broker.drain(queue)
    assert {letter.headers["hookline-endpoint"] for letter in letters} == set(urls)
    assert {letter.headers["hookline-reason"] for letter in letters} == {"blocked_destination"}
    assert {letter.headers["hookline-detail"] for letter in letters} == {BLOCKED_MESSAGE}
    assert receiver.requests == []


async def test_send_test_never_dials_a_host_that_normalises_to_loopback(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    """send-test goes through the same guarded client: a host that only becomes 127.0.0.1
    once normalised is reported as blocked_destination and exits 1, reaching nothing."""
    port = port_of(receiver.base_url)
    for host in LOOPBACK_SPELLINGS:
        settings = make_settings(
            "unused",
            [endpoint("loop", "http://placeholder.example/", ["a.#"])],
            security={"allow_private_networks": False},
        )
        settings = with_unchecked_urls(settings, {"loop": f"http://{host}:{port}/hook"})
        assert await run_send_test(settings, "loop") == 1
        assert capsys.readouterr().out.startswith("loop: blocked_destination after ")
    assert receiver.requests == []


async def test_connector_check_holds_without_the_literal_precheck(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: with the pre-attempt literal check switched off, the check on the
    socket about to be dialled still refuses a loopback literal, and the attempt is a
    blocked_destination with the usual detail."""
    monkeypatch.setattr("worker.delivery.check_literal_host", lambda *_, **__: None)
    settings = make_settings(
        "unused",
        [endpoint("loop", receiver.url("/hook"), ["#"])],
        security={"allow_private_networks": False},
    )
    result = await attempt_once(settings, "evt-d1")
    assert (result.error, result.detail) == ("blocked_destination", BLOCKED_MESSAGE)
    assert receiver.requests == []


async def start_fake_proxy(seen: list[bytes]) -> tuple[asyncio.Server, int]:
    """An HTTP proxy that answers 204 to every request and records its head."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_proxy_precheck_refuses_a_name_with_any_refused_address() -> None:
    """Through a proxy, a name resolving to a public and a private address is refused (the
    proxy could connect to either) and the proxy receives nothing."""
    seen: list[bytes] = []
    server, proxy_port = await start_fake_proxy(seen)
    settings = make_settings(
        "unused",
        [endpoint("via", "http://mixed.example/hook", ["#"])],
        delivery={"proxy_url": f"http://127.0.0.1:{proxy_port}"},
        security={"allow_private_networks": False},
    )
    dns = RecordingResolver("93.184.216.34", "10.0.0.1")
    client = EndpointClient(settings, settings.endpoints[0], resolver=dns)
    try:
        result = await client.attempt("evt-p2", b"{}")
    finally:
        await client.close()
        server.close()
    assert (result.error, result.detail) == ("blocked_destination", BLOCKED_MESSAGE)
    assert dns.names == ["mixed.example"]
    assert seen == []


async def test_proxy_precheck_resolves_the_host_the_request_names() -> None:
    """Through a proxy, the name checked is the one the proxy is asked for: the IDNA 2008
    form yarl builds (xn--fa-hia for 'fa\u00df'), not what the system codec would make of
    the written host (IDNA 2003 maps it to 'fass')."""
    seen: list[bytes] = []
    server, proxy_port = await start_fake_proxy(seen)
    settings = make_settings(
        "unused",
        [endpoint("via", "http://FA\u00df.example/hook", ["#"])],
        delivery={"proxy_url": f"http://127.0.0.1:{proxy_port}"},
        security={"allow_private_networks": False},
    )
    dns = RecordingResolver("93.184.216.34")
    client = EndpointClient(settings, settings.endpoints[0], resolver=dns)
    try:
        result = await client.attempt("evt-p3", b"{}")
    finally:
        await client.close()
        server.close()
    assert result.status == 204
    assert dns.names == ["xn--fa-hia.example"]
    assert seen[0].startswith(b"POST http://xn--fa-hia.example/hook HTTP/1.1")


async def test_connection_failures_share_one_detail() -> None:
    """Refused, reset and unreachable destinations are all connection_error with the same
    detail, so the detail cannot be used to scan ports behind an endpoint URL."""

    async def reset(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    reset_port = server.sockets[0].getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    results = []
    try:
        for url in (
            f"http://127.0.0.1:{closed_port}/hook",  # refused
            f"http://127.0.0.1:{reset_port}/hook",  # accepted, then reset
            "http://224.0.0.1:80/hook",  # a multicast address: network unreachable
        ):
            client = client_for(url, timeout_s=3)
            try:
                results.append(await client.attempt("evt-c1", b"{}"))
            finally:
                await client.close()
    finally:
        server.close()
    assert [result.error for result in results] == ["connection_error"] * 3
    assert len({result.detail for result in results}) == 1, [r.detail for r in results]


RETRY_AFTER_CASES = [
    ("120", 120.0),
    ("0", 0.0),
    ("0" * 40 + "7", 7.0),
    ("9" * 5000, MAX_DELAY_S),  # more digits than int() accepts
    ("99999999999", MAX_DELAY_S),
    (str(MAX_DELAY_S + 1), MAX_DELAY_S),
    ("\u0663", None),  # Arabic-Indic digit three: str.isdigit() says yes
    ("\uff13\uff10", None),  # fullwidth 30
    ("-5", None),
    ("1.5", None),
    ("1e9", None),
    ("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", None),  # year past C long
    ("Mon, 01 Jan 2026 99999999999999999999:00:00 GMT", None),
    ("Tue, 01 Jan 10000 00:00:00 GMT", None),
    ("Fri, 31 Dec 9999 23:59:59 -2359", MAX_DELAY_S),  # far future: capped
    ("Mon, 01 Jan 0001 00:00:00 +2359", 0.0),
    ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
    ("\x00", None),
]


@pytest.mark.parametrize(("value", "expected"), RETRY_AFTER_CASES)
def test_retry_after_is_total_and_capped(value: str, expected: float | None) -> None:
    """Whatever the endpoint writes, Retry-After gives seconds in [0, MAX_DELAY_S] or None,
    and never an exception."""
    assert parse_retry_after(value) == expected


http_dates = st.builds(
    "{}, {:02d} {} {} {:02d}:{:02d}:{:02d} {}".format,
    st.sampled_from(["Mon", "Tue", "Sun", "X"]),
    st.integers(min_value=-(10**25), max_value=10**25),
    st.sampled_from(["Jan", "Feb", "Dec", "Foo"]),
    st.integers(min_value=-(10**25), max_value=10**25),
    st.integers(min_value=-99, max_value=10**20),
    st.integers(min_value=0, max_value=99),
    st.integers(min_value=0, max_value=99),
    st.one_of(st.sampled_from(["GMT", "UTC", "EST", "+0000", "-2359", ""]), st.text(max_size=8)),
)


@hypothesis.settings(max_examples=1000, deadline=None)
@hypothesis.given(st.one_of(st.text(), http_dates, st.from_regex(r"\A\s*[0-9]{1,60}\s*\Z")))
def test_retry_after_never_raises(value: str) -> None:
    """Arbitrary strings, date-shaped ones with any numbers, and long digit runs: the
    result is None or a number of seconds within [0, MAX_DELAY_S]."""
    seconds = parse_retry_after(value)
    assert seconds is None or 0 <= seconds <= MAX_DELAY_S


@pytest.mark.parametrize(
    "header",
    [
        b"Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
        b"9" * 6000,
        "\u0663".encode(),
        b"\xff\xfe",
    ],
)
async def test_hostile_retry_after_is_an_outcome_not_a_crash(header: bytes) -> None:
    """A real endpoint answering 429 with a hostile Retry-After gives an attempt result
    with a bounded delay (or none), not an exception out of the client."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: "
            + header
            + b"\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    client = client_for(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook")
    try:
        result = await client.attempt("evt-ra", b"{}")
    finally:
        await client.close()
        server.close()
    assert result.status == 429
    assert result.retry_after_s is None or 0 <= result.retry_after_s <= MAX_DELAY_S


async def test_ca_bundle_adds_to_the_system_trust_store(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    exchange_name: str,
    run_worker: RunWorker,
) -> None:
    """One worker delivers both to an endpoint whose certificate chains to a CA in the
    system store (played by SSL_CERT_FILE, which OpenSSL's default paths honour) and to one
    signed by the private CA in security.ca_bundle: the bundle adds to the system CAs."""
    public_ca, private_ca = trustme.CA(), trustme.CA()
    system_store = tmp_path / "system.pem"
    public_ca.cert_pem.write_to_path(str(system_store))
    empty_dir = tmp_path / "certs"
    empty_dir.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(system_store))
    monkeypatch.setenv("SSL_CERT_DIR", str(empty_dir))
    bundle = tmp_path / "private.pem"
    private_ca.cert_pem.write_to_path(str(bundle))
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response()

    contexts = []
    for authority in (public_ca, private_ca):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("127.0.0.1").configure_cert(context)
        contexts.append(context)
    async with (
        serve(record, ssl_context=contexts[0]) as public_url,
        serve(record, ssl_context=contexts[1]) as private_url,
    ):
        settings = make_settings(
            exchange_name,
            [
                endpoint("public", public_url.replace("/hook", "/public"), ["t.*"]),
                endpoint("private", private_url.replace("/hook", "/private"), ["t.*"]),
            ],
            security={
                "require_https": True,
                "allow_private_networks": True,
                "ca_bundle": str(bundle),
            },
        )
        await run_worker(settings)
        await publish_events(exchange_name, 1, "t.x", "tls")

        async def both_delivered() -> bool:
            return sorted(hits) == ["/private", "/public"]

        await eventually(both_delivered, timeout_s=10)


header_lines = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"Retry-After",
                b"Content-Length",
                b"Transfer-Encoding",
                b"Content-Encoding",
                b"Set-Cookie",
                b"Content-Type",
                b"X-Any",
            ]
        ),
        st.binary(max_size=40),
    ),
    max_size=5,
)
raw_responses = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda status, headers, body: (
            b"HTTP/1.1 "
            + status
            + b" X\r\n"
            + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            + b"\r\n"
            + body
        ),
        st.one_of(st.sampled_from([b"200", b"429", b"503", b"301", b"500"]), st.binary(max_size=6)),
        header_lines,
        st.binary(max_size=100),
    ),
)


async def test_anything_an_endpoint_answers_is_an_outcome() -> None:
    """Arbitrary bytes, and responses with arbitrary status and header values, from a real
    socket: the attempt always ends in a result, never in an exception that classify_error
    would re-raise as Hookline's own failure."""
    responses: list[bytes] = []

    # Examples are drawn first, then sent from one server: hypothesis's own async support
    # differs between the versions pyproject.toml allows.
    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(raw_responses)
    def collect(response: bytes) -> None:
        responses.append(response)

    collect()
    answered = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        await reader.readuntil(b"\r\n\r\n")
        writer.write(responses[answered])
        answered += 1
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    try:
        for _ in responses:
            # A client per response: each attempt on a connection of its own.
            client = client_for(url, timeout_s=2)
            try:
                result = await client.attempt("evt-fz", b"{}")
            finally:
                await client.close()
            assert result.status is not None or result.error is not None
            assert result.retry_after_s is None or 0 <= result.retry_after_s <= MAX_DELAY_S
    finally:
        server.close()


async def test_session_is_opened_by_the_first_attempt(receiver: Receiver) -> None:
    """A new client holds no connection pool; its first attempt opens one."""
    client = client_for(receiver.url("/lazy"))
    try:
        assert not client.has_session
        result = await client.attempt("evt-l1", b"{}")
        assert result.delivered
        assert client.has_session
    finally:
        await client.close()


async def test_idle_session_is_closed_and_the_next_attempt_reopens(receiver: Receiver) -> None:
    """close_if_idle leaves a session used within idle_s, closes an idle one, and the next
    attempt delivers through a new session."""
    client = client_for(receiver.url("/idle"))
    try:
        assert not await client.close_if_idle(0.0)  # nothing open yet
        assert (await client.attempt("evt-i1", b"{}")).delivered
        assert not await client.close_if_idle(3600.0)  # used well within the hour
        assert client.has_session
        assert await client.close_if_idle(0.0)
        assert not client.has_session
        assert (await client.attempt("evt-i2", b"{}")).delivered
        assert client.has_session
    finally:
        await client.close()
    assert [r.headers["webhook-id"] for r in receiver.on("/idle")] == ["evt-i1", "evt-i2"]


async def test_running_attempt_keeps_its_session_open() -> None:
    """close_if_idle does not close the session under an attempt still waiting for its
    answer, however old that attempt is; once it has ended, the session is closed."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response()

    async with serve(slow) as url:
        client = client_for(url)
        try:
            running = asyncio.ensure_future(client.attempt("evt-s1", b"{}"))
            await asyncio.wait_for(entered.wait(), timeout=5)
            assert not await client.close_if_idle(0.0)
            assert client.has_session
            release.set()
            assert (await running).delivered
            assert await client.close_if_idle(0.0)
        finally:
            release.set()
            await client.close()


async def test_attempt_during_an_idle_close_opens_a_new_session(receiver: Receiver) -> None:
    """An attempt that starts while close_if_idle is still closing the old session does not
    use it: it delivers through a session of its own, which stays open."""
    client = client_for(receiver.url("/race"))
    try:
        assert (await client.attempt("evt-c1", b"{}")).delivered
        closing = asyncio.ensure_future(client.close_if_idle(0.0))
        await asyncio.sleep(0)  # the close has begun and not finished
        assert not closing.done()
        assert (await client.attempt("evt-c2", b"{}")).delivered
        assert await closing
        assert client.has_session
    finally:
        await client.close()


async def test_closed_client_never_reopens(receiver: Receiver) -> None:
    """close() is final: a later attempt raises RuntimeError (what a closed aiohttp session
    raises, and so a handler_error in the consumer) without sending anything or opening a
    session, and close_if_idle has nothing to close."""
    client = client_for(receiver.url("/closed"))
    assert (await client.attempt("evt-x1", b"{}")).delivered
    await client.close()
    with pytest.raises(RuntimeError):
        await client.attempt("evt-x2", b"{}")
    assert not client.has_session
    assert not await client.close_if_idle(0.0)
    assert [r.headers["webhook-id"] for r in receiver.on("/closed")] == ["evt-x1"]


async def test_concurrent_first_attempts_share_one_pool() -> None:
    """Twenty attempts started together on a new client open one session: with
    max_in_flight 1 a single pool lets one request at a time reach the endpoint, where a
    pool per attempt would let them overlap."""
    current = highest = 0

    async def counting(_: web.Request) -> web.Response:
        nonlocal current, highest
        current += 1
        highest = max(highest, current)
        await asyncio.sleep(0.01)
        current -= 1
        return web.Response()

    async with serve(counting) as url:
        client = client_for(url, max_in_flight=1)
        try:
            results = await asyncio.gather(
                *(client.attempt(f"evt-m{index}", b"{}") for index in range(20))
            )
            assert client.has_session
        finally:
            await client.close()
    assert all(result.delivered for result in results)
    assert highest == 1


async def test_clients_share_one_tls_context_with_the_ca_bundle(
    tmp_path: Path, private_ca: tuple[trustme.CA, ssl.SSLContext]
) -> None:
    """One context from client_tls_context, given to several clients, trusts
    security.ca_bundle for each of them."""
    async with serve(ok, ssl_context=private_ca[1]) as url:
        two = url.replace("/hook", "/two")
        settings = trusting(
            private_ca, tmp_path, [endpoint("one", url, ["#"]), endpoint("two", two, ["#"])]
        )
        tls = client_tls_context(settings)
        clients = [EndpointClient(settings, ep, tls=tls) for ep in settings.endpoints]
        try:
            results = [await client.attempt("evt-t1", b"{}") for client in clients]
        finally:
            for client in clients:
                await client.close()
    assert [result.status for result in results] == [200, 200]
