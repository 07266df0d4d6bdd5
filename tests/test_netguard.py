"""The SSRF guard refuses every non-public address class, in every spelling."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from worker.exceptions import BlockedDestination
from worker.netguard import GuardedResolver, check_literal_host, is_allowed_address

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
