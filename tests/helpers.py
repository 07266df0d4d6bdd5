"""Helpers shared by several test modules that are not fixtures: hypothesis strategies for
what a hostile publisher can put in a message."""

from __future__ import annotations

import decimal
import re
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel
from hypothesis import strategies as st

from worker.topology import dead_letter_queue


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


# Publisher-controlled text that acts on a terminal if printed as it is: clear screen (ESC
# CSI), a C1 CSI, a right-to-left override, and rich markup.
TERMINAL_ATTACK = "\x1b[2J\x9b\u202e[bold red]"
# Raw characters that must never reach an operator's terminal (newline aside, which
# separates lines): C0, DEL, C1, bidi and other invisible format characters, separators,
# lone surrogates.
RAW_UNSAFE_RE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)


def assert_terminal_safe(output: str) -> None:
    """Fail if ``output`` holds a raw control, format or separator character."""
    found = RAW_UNSAFE_RE.search(output)
    assert found is None, f"raw {found.group()!r} at {found.start()} of {output!r}"


async def put_raw_dead_letter(
    channel: AbstractChannel,
    exchange: str,
    body: bytes,
    headers: dict[str, Any],
    message_id: str | None = None,
) -> None:
    """A message published straight into ``<exchange>.dead-letter``, as a hostile (or merely
    unusual) publisher could: any body, any header values of any AMQP type."""
    await channel.default_exchange.publish(
        aio_pika.Message(
            body,
            headers=headers,
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        dead_letter_queue(exchange),
    )
