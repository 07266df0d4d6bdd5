"""Refusing non-public destinations at connect time, so DNS rebinding cannot slip past.

The resolver hands aiohttp only addresses that passed the check, and aiohttp connects only
to what the resolver returned. IP-literal hosts skip resolvers in aiohttp, so they are
checked separately with :func:`check_literal_host`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from worker.exceptions import BlockedDestination

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

NAT64_NETWORKS = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, compatible, NAT64, 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    packed = address.packed
    if any(address in network for network in NAT64_NETWORKS) or (
        packed[:12] == bytes(12) and packed[12:] != bytes(4) and packed[12:] != b"\x00\x00\x00\x01"
    ):
        return ipaddress.IPv4Address(packed[12:])
    return None


def is_allowed_address(
    address: IPAddress, *, allow_private: bool, allowed_networks: Sequence[Network] = ()
) -> bool:
    """True when Hookline may connect to ``address``."""
    if allow_private or any(address in network for network in allowed_networks):
        return True
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        inner = _embedded_ipv4(address)
        if inner is not None:
            return is_allowed_address(inner, allow_private=False, allowed_networks=allowed_networks)
    return address.is_global and not address.is_multicast


def parse_ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_literal_host(
    host: str, *, allow_private: bool, allowed_networks: Sequence[Network] = ()
) -> None:
    """Raise :class:`BlockedDestination` for an IP-literal host that is not allowed."""
    address = parse_ip_literal(host)
    if address is not None and not is_allowed_address(
        address, allow_private=allow_private, allowed_networks=allowed_networks
    ):
        raise BlockedDestination(f"{address} is not a public address")


class GuardedResolver(AbstractResolver):
    """Resolves with the default resolver and drops every address that is not allowed."""

    def __init__(
        self,
        *,
        allowed_networks: Sequence[Network] = (),
        inner: AbstractResolver | None = None,
    ) -> None:
        self._allowed_networks = tuple(allowed_networks)
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [
            result
            for result in results
            if is_allowed_address(
                ipaddress.ip_address(result["host"]),
                allow_private=False,
                allowed_networks=self._allowed_networks,
            )
        ]
        if not allowed:
            raise BlockedDestination(f"{host} resolves only to non-public addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
