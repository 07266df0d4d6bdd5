"""Helpers shared by several test modules that are not fixtures: hypothesis strategies for
what a hostile publisher can put in a message."""

from __future__ import annotations

import decimal
import socket
from datetime import UTC, datetime
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import strategies as st


def amqp_field_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Any value a header can decode to: what pamqp hands the worker for each AMQP field type,
    including floats from 64-bit doubles and strings that are not UTF-8 (bytes)."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.decimals(allow_nan=True, allow_infinity=True, places=None),
        st.text(max_size=40),
        st.binary(max_size=40),
        st.datetimes(
            min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
        ),
        st.builds(bytearray, st.binary(max_size=16)),
        st.just(decimal.Decimal("1E+300")),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=10), children, max_size=4),
        ),
        max_leaves=max_leaves,
    )


class RecordingResolver(AbstractResolver):
    """A DNS server answering every name with the same addresses, noting each name asked:
    a hostile DNS record, and a witness of which host spelling was looked up."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.names: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.names.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        return None
