"""hookline-* headers: total readers, and copies that carry only what survives re-encoding."""

from __future__ import annotations

import decimal
import struct
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer import headers
from tests.helpers import amqp_field_values


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 0),
        (3, 3),
        ("4", 4),
        (b"5", 5),
        (bytearray(b" 6 "), 6),
        ("junk", 0),
        ("٣", 0),  # a non-ASCII digit
        (-2, 0),
        (10**12, 1_000_000),
        ("9" * 400, 0),
        ([1], 0),
        (True, 0),
        (2.0, 2),
        (2.5, 0),
        (float("inf"), 0),
        (float("nan"), 0),
        (1e300, 1_000_000),
        (decimal.Decimal("3"), 0),
        ({"a": 1}, 0),
    ],
)
def test_counters_are_read_totally(value: Any, expected: int) -> None:
    """Any hookline-attempts value (missing, text, bytes, non-finite, huge, wrong type)
    gives a sane count and never raises."""
    assert headers.attempts_made({} if value is None else {headers.ATTEMPTS: value}) == expected


def test_copies_drop_broker_and_state_headers() -> None:
    """x- headers (x-death above all) and hookline- state never travel into a copy."""
    original = {
        "x-death": [{}],
        "X-First-Death-Queue": "q",
        "hookline-attempts": 2,
        "Hookline-Reason": "r",
        "trace-id": "abc",
    }
    assert headers.carried(original) == ({"trace-id": "abc"}, [])


def test_values_that_would_change_are_left_out_and_named() -> None:
    """A 64-bit float (the client re-encodes floats as 32 bits), a non-finite decimal, a
    millisecond timestamp and a table holding any of them are left out, and named in
    hookline-dropped-headers; exact values stay."""
    float32 = struct.unpack(">f", struct.pack(">f", 1.5))[0]
    original = {
        "wide": 1e300,
        "precise": 0.1,
        "nan": decimal.Decimal("NaN"),
        "millis": datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC),
        "nested": {"ok": 1, "bad": 1e-300},
        "exact": float32,
        "decimal": decimal.Decimal("12.50"),
        "when": datetime(2026, 1, 1, tzinfo=UTC),
        "list": [1, "two", None, True],
    }
    kept, dropped = headers.carried(original)
    assert sorted(dropped) == ["millis", "nan", "nested", "precise", "wide"]
    assert kept == {key: original[key] for key in ("exact", "decimal", "when", "list")}
    retry = headers.retry_headers(original, attempts=2, handler_errors=0, tier="5s")
    assert retry[headers.DROPPED_HEADERS] == "wide,precise,nan,millis,nested"
    again = headers.retry_headers(retry, attempts=3, handler_errors=0, tier="30s")
    assert again[headers.DROPPED_HEADERS] == "wide,precise,nan,millis,nested"
    letter = headers.dead_letter_headers(
        again,
        endpoint="e",
        reason="attempts_exhausted",
        attempts=3,
        last_status="500",
        detail="server error",
    )
    assert letter[headers.DETAIL].startswith("server error [headers left out")
    assert "wide,precise" in letter[headers.DETAIL]


def test_strings_that_are_not_utf8_travel_as_the_same_bytes() -> None:
    """pamqp decodes such a string as bytes and cannot encode bytes: they go as a byte array."""
    kept, dropped = headers.carried({"raw": b"\xff\xfe", "deep": {"raw": [b"\x80"]}})
    assert dropped == []
    assert kept == {"raw": bytearray(b"\xff\xfe"), "deep": {"raw": [bytearray(b"\x80")]}}


def test_dropped_names_are_printable_and_bounded() -> None:
    """A hostile header name cannot inject text into the note."""
    original = {"a,b\x1b[31m": 1e300, "z" * 300: 1e300}
    copied = headers.retry_headers(original, attempts=1, handler_errors=0, tier="5s")
    note = copied[headers.DROPPED_HEADERS]
    assert note.isascii() and "\x1b" not in note
    assert len(note) <= headers.MAX_DROPPED_NAMES_CHARS


@given(st.dictionaries(st.text(max_size=20), amqp_field_values(), max_size=6))
def test_every_carried_header_can_be_published(original: dict[str, Any]) -> None:
    """Whatever arrives, what is carried encodes, and the rest is named, never raised."""
    from pamqp import encode

    kept, dropped = headers.carried(original)
    encode.field_table(kept)
    assert set(kept) | set(dropped) <= set(original)


def test_pamqp_still_dispatches_through_the_tables_hookline_extends() -> None:
    """producer/connection.py registers its tolerant decoders in pamqp's dispatch tables;
    a pamqp release that stopped using them would silently bring back decode failures that
    close connections. This fails first."""
    from pamqp import decode

    from producer.connection import tolerate_undecodable_properties

    tolerate_undecodable_properties()
    assert decode.METHODS["shortstr"].__module__ == "producer.connection"
    assert decode.TABLE_MAPPING[b"T"].__module__ == "producer.connection"
    assert decode.by_type(b"\x02\xff\xfe", "shortstr") == (3, "\ufffd\ufffd")
    table = b"\x00\x00\x00\x0c" + b"\x02\xff\xfe" + b"T" + b"\x7f" + b"\xff" * 7
    consumed, decoded = decode.by_type(table, "table")
    assert consumed == 16
    [(name, value)] = decoded.items()
    assert name == "\udcff\udcfe" and repr(value) == "<unrepresentable timestamp>"
