"""Refusing non-public destinations at connect time, so DNS rebinding cannot slip past.

Three checks, all on the host aiohttp dials (the ASCII form ``yarl.URL`` normalises a URL's
host to, see ``EndpointSettings.host``), never on the host as written:

- :class:`GuardedResolver` hands aiohttp only addresses that passed the check, and aiohttp
  connects only to what the resolver returned.
- IP-literal hosts skip resolvers in aiohttp, so :func:`check_literal_host` checks them
  before each attempt, and :func:`guarded_socket_factory` checks every address at the
  moment its socket is created, whatever path led there.
- Through a proxy the connector dials the proxy, so :func:`check_every_address` checks all
  the addresses the endpoint's name has before each attempt.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import AddrInfoType, SocketFactoryType
from aiohttp.resolver import DefaultResolver

from worker.exceptions import BlockedDestination

NUMERIC_LABEL_RE = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The well-known NAT64 prefix carries an IPv4 address in its last 32 bits, which is checked.
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
# Refused whole, whatever they embed: Python's ``is_global`` says True for all three.
# Local-use NAT64 (RFC 8215) translates to whatever the operator's translator is set up
# for, so the embedded address says nothing about where the packet goes; site-local is
# deprecated but still routed inside some networks; SIIT's IPv4-translated form
# (``::ffff:0:a.b.c.d``, RFC 2765) reaches IPv4 hosts through a translator.
REFUSED_IPV6_NETWORKS = (
    ipaddress.IPv6Network("64:ff9b:1::/48"),
    ipaddress.IPv6Network("fec0::/10"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
)
# One message for every refusal at the socket: aiohappyeyeballs re-raises the first of
# several connect errors only when they all read the same, and a detail that named the
# address or port would tell an endpoint's owner more than that it was refused.
BLOCKED_MESSAGE = "destination address refused by the security settings"


class BlockedAddress(BlockedDestination, OSError):
    """A socket was about to be opened to a refused address. An ``OSError`` as well, so
    that aiohttp's connector treats it as a failed connect (and wraps it in
    ``ClientConnectorError``) instead of as a bug."""

    def __init__(self) -> None:
        super().__init__(BLOCKED_MESSAGE)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, compatible, NAT64, 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    packed = address.packed
    if address in NAT64_WELL_KNOWN or (
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
        if address.scope_id or any(address in network for network in REFUSED_IPV6_NETWORKS):
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


def is_numeric_host(host: str) -> bool:
    """Every label numeric: dotted-quad, or a decimal, octal, hex or short IPv4 form
    (2130706433, 0177.0.0.1, 127.1) that resolvers read as an address."""
    return all(NUMERIC_LABEL_RE.fullmatch(label) for label in host.removesuffix(".").split("."))


def check_literal_host(
    host: str, *, allow_private: bool, allowed_networks: Sequence[Network] = ()
) -> None:
    """Raise :class:`BlockedDestination` for an IP-literal host that is not allowed, and for
    a legacy numeric IPv4 form (what it reaches depends on who parses it).

    ``host`` must be the normalised host (``EndpointSettings.host``): written forms such as
    circled or fullwidth digits are not literals until yarl has normalised them.
    """
    if allow_private:
        return
    address = parse_ip_literal(host)
    if address is None:
        if is_numeric_host(host):
            raise BlockedDestination(BLOCKED_MESSAGE)
        return
    if not is_allowed_address(address, allow_private=False, allowed_networks=allowed_networks):
        raise BlockedDestination(BLOCKED_MESSAGE)


def guarded_socket_factory(
    allowed_networks: Sequence[Network] = (),
) -> SocketFactoryType:
    """A ``TCPConnector(socket_factory=...)`` that refuses to create a socket for an address
    that is not allowed: it sees the exact address about to be dialled, after every
    normalisation and resolution, so nothing can reach a refused address past it."""
    networks = tuple(allowed_networks)

    def create(addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        try:
            address = ipaddress.ip_address(sockaddr[0])
            if isinstance(address, ipaddress.IPv6Address) and address.scope_id is None:
                # A scope in the socket address counts like one written in the host.
                scope = sockaddr[3] if len(sockaddr) >= 4 else 0
                if scope:
                    address = ipaddress.IPv6Address(f"{address}%{scope}")
        except (ValueError, TypeError, IndexError):
            raise BlockedAddress from None
        if not is_allowed_address(address, allow_private=False, allowed_networks=networks):
            raise BlockedAddress
        return socket.socket(family=family, type=type_, proto=proto)

    return create


async def check_every_address(
    resolver: AbstractResolver, host: str, *, allowed_networks: Sequence[Network] = ()
) -> None:
    """Raise :class:`BlockedDestination` unless every address ``host`` resolves to is
    allowed. For the proxy mode: the proxy resolves the name itself and may connect to any
    of its addresses, so one refused address refuses the name."""
    if parse_ip_literal(host) is not None:
        check_literal_host(host, allow_private=False, allowed_networks=allowed_networks)
        return
    results = await resolver.resolve(host, 0, socket.AF_UNSPEC)
    if not results or not all(
        is_allowed_address(
            ipaddress.ip_address(result["host"]),
            allow_private=False,
            allowed_networks=allowed_networks,
        )
        for result in results
    ):
        raise BlockedDestination(BLOCKED_MESSAGE)


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
            raise BlockedDestination(BLOCKED_MESSAGE)
        return allowed

    async def close(self) -> None:
        await self._inner.close()
