"""The SSRF guard refuses every non-public address class, in every spelling."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from tests.helpers import RecordingResolver
from worker.delivery import classify_error
from worker.exceptions import BlockedDestination
from worker.netguard import (
    BLOCKED_MESSAGE,
    BlockedAddress,
    GuardedResolver,
    check_every_address,
    check_literal_host,
    guarded_socket_factory,
    is_allowed_address,
)
from worker.outcomes import ErrorKind

BLOCKED = [
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.169.254",
    "0.0.0.0",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "ff02::1",
    "2001:db8::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "2002:7f00:1::1",
    "::127.0.0.1",
]
ALLOWED = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_refused(address: str) -> None:
    """Loopback, private, CGNAT, link-local, multicast, reserved, ULA, mapped and NAT64 forms."""
    assert not is_allowed_address(ipaddress.ip_address(address), allow_private=False)
    with pytest.raises(BlockedDestination):
        check_literal_host(address, allow_private=False)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_pass(address: str) -> None:
    """Globally routable addresses (and mapped forms of them) are allowed."""
    assert is_allowed_address(ipaddress.ip_address(address), allow_private=False)


def test_allow_private_and_allowed_networks() -> None:
    """allow_private_networks lifts the guard; allowed_networks opens chosen ranges only."""
    loopback = ipaddress.ip_address("127.0.0.1")
    assert is_allowed_address(loopback, allow_private=True)
    networks = [ipaddress.ip_network("10.1.0.0/16")]
    assert is_allowed_address(
        ipaddress.ip_address("10.1.2.3"), allow_private=False, allowed_networks=networks
    )
    assert not is_allowed_address(
        ipaddress.ip_address("10.2.0.1"), allow_private=False, allowed_networks=networks
    )


class FixedResolver(AbstractResolver):
    """Answers a fixed list of addresses, the way a hostile DNS server could."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=address, port=port, family=family, proto=0, flags=0)
            for address in self.addresses
        ]

    async def close(self) -> None:
        return None


async def test_resolver_drops_private_answers() -> None:
    """A name resolving to private and public addresses yields only the public ones."""
    resolver = GuardedResolver(inner=FixedResolver("10.0.0.1", "93.184.216.34", "::1"))
    results = await resolver.resolve("mixed.example", 443)
    assert [result["host"] for result in results] == ["93.184.216.34"]


async def test_resolver_refuses_names_with_only_private_answers() -> None:
    """A name resolving only to internal addresses (or 'localhost') is refused."""
    with pytest.raises(BlockedDestination):
        await GuardedResolver(inner=FixedResolver("169.254.169.254")).resolve("metadata", 80)
    with pytest.raises(BlockedDestination):
        await GuardedResolver().resolve("localhost", 80)


# Python's is_global says True for every one of these.
GLOBAL_BUT_REFUSED = [
    "fec0::1",  # deprecated site-local, fec0::/10
    "feff:ffff::1",
    "::ffff:0:7f00:1",  # SIIT IPv4-translated ::ffff:0:a.b.c.d, to 127.0.0.1
    "::ffff:0:808:808",  # ... and to a public address: the translator decides, refused too
    "64:ff9b:1::7f00:1",  # local-use NAT64, 64:ff9b:1::/48, whatever it embeds
    "64:ff9b:1::808:808",
    "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
]


@pytest.mark.parametrize("address", GLOBAL_BUT_REFUSED)
def test_site_local_siit_and_local_use_nat64_are_refused(address: str) -> None:
    """fec0::/10, ::ffff:0:0:0/96 and the whole of 64:ff9b:1::/48 are refused although
    Python calls them global; allowed_networks can still open them."""
    parsed = ipaddress.ip_address(address)
    assert parsed.is_global
    assert not is_allowed_address(parsed, allow_private=False)
    with pytest.raises(BlockedDestination):
        check_literal_host(address, allow_private=False)
    opened = [ipaddress.ip_network(f"{address}/128")]
    assert is_allowed_address(parsed, allow_private=False, allowed_networks=opened)


def addr_info(address: str, port: int = 80) -> tuple[int, int, int, str, tuple[object, ...]]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr = (address, port, 0, 0) if ":" in address else (address, port)
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "::1", "::ffff:127.0.0.1", "fec0::1"])
def test_socket_factory_refuses_before_a_socket_exists(address: str) -> None:
    """The connector-level check raises one exception that is both a BlockedDestination and
    an OSError, with the same message for every address."""
    create = guarded_socket_factory()
    with pytest.raises(BlockedAddress) as caught:
        create(addr_info(address))
    assert isinstance(caught.value, OSError) and isinstance(caught.value, BlockedDestination)
    assert str(caught.value) == BLOCKED_MESSAGE


def test_socket_factory_creates_sockets_for_allowed_addresses() -> None:
    """Public addresses and ranges opened by allowed_networks get a real socket."""
    create = guarded_socket_factory([ipaddress.ip_network("10.1.0.0/16")])
    for address in ("93.184.216.34", "10.1.2.3", "2606:4700:4700::1111"):
        sock = create(addr_info(address))
        try:
            assert sock.type == socket.SOCK_STREAM
        finally:
            sock.close()


async def test_connector_never_dials_a_refused_address() -> None:
    """Through aiohttp's real connector, an IP literal (which no resolver sees) and a name
    with several refused addresses both fail before any connection reaches the listening
    server, and classify_error calls the wrapped error blocked_destination."""
    connections = 0

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connector = aiohttp.TCPConnector(
        socket_factory=guarded_socket_factory(),
        resolver=RecordingResolver("127.0.0.1", "127.0.0.2", "::1"),
    )
    errors = []
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            for url in (f"http://127.0.0.1:{port}/", f"http://several.example:{port}/"):
                with pytest.raises(aiohttp.ClientConnectorError) as caught:
                    await session.get(url)
                errors.append(caught.value)
    finally:
        server.close()
        await server.wait_closed()
    assert connections == 0
    for error in errors:
        assert isinstance(error.os_error, BlockedAddress)
        assert classify_error(error) == (ErrorKind.BLOCKED_DESTINATION, BLOCKED_MESSAGE)


async def test_every_address_must_pass_for_the_proxy_precheck() -> None:
    """Before a request through a proxy, one refused address among public ones refuses the
    name (the proxy may pick any); only names whose every address is allowed pass."""
    with pytest.raises(BlockedDestination):
        await check_every_address(RecordingResolver("93.184.216.34", "10.0.0.1"), "mixed.example")
    with pytest.raises(BlockedDestination):
        await check_every_address(RecordingResolver("2606:4700::1", "fec0::1"), "six.example")
    with pytest.raises(BlockedDestination):
        await check_every_address(RecordingResolver(), "127.0.0.1")
    await check_every_address(RecordingResolver("93.184.216.34", "8.8.8.8"), "public.example")
    await check_every_address(
        RecordingResolver("93.184.216.34", "10.1.0.5"),
        "partner.example",
        allowed_networks=[ipaddress.ip_network("10.1.0.0/16")],
    )


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.1", "0177.0.0.1", "8.8.8.8."])
def test_legacy_numeric_hosts_are_refused_before_the_attempt(host: str) -> None:
    """A numeric host that is not a dotted quad (config load refuses it, yarl can still
    produce one from other digits) is refused whatever it would point at."""
    with pytest.raises(BlockedDestination):
        check_literal_host(host, allow_private=False)
