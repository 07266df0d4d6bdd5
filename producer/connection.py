"""Opening broker connections the same way everywhere: robust, named, TLS verified, and
tolerant of message properties the AMQP client cannot decode.

Why the tolerance: pamqp decodes every frame of a connection in one reader, and a content
header it cannot decode (a ``timestamp`` beyond the year 9999, a ``content_type``,
``message_id`` or header name that is not UTF-8) raises out of that reader, so aiormq closes
the whole connection. The message is then redelivered and does it again: one hostile
publish would disturb every endpoint of a worker forever. :func:`tolerate_undecodable_properties`
registers decoders for those three field types in pamqp's own dispatch tables that decode
what they can instead of raising, so such a message reaches the worker and ends like any
other:

- a property that is not UTF-8 (``content_type``, ``message_id``) with replacement
  characters, and an unrepresentable ``timestamp`` property as absent;
- in a header table, a name that is not UTF-8 with its bytes kept as lone surrogates, and an
  unrepresentable timestamp as :data:`UNREPRESENTABLE`. Neither can be encoded again, so
  copies leave such headers out and name them (``hookline-dropped-headers``): nothing is
  changed silently.
"""

from __future__ import annotations

import logging
import struct
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from pamqp import common, decode

from producer.settings import BrokerSettings

# Everything that means "the broker or the connection went away": aio-pika's own list. It
# includes RuntimeError, which aio-pika raises for operations on a closed channel or
# connection; a RuntimeError from a bug is therefore handled as a lost connection (retried,
# logged with its class) rather than crashing the worker.
BROKER_GONE: tuple[type[BaseException], ...] = aio_pika.exceptions.CONNECTION_EXCEPTIONS

_strict_timestamp = decode.timestamp


class Unrepresentable:
    """A header value that could be decoded from the wire but not represented (a timestamp
    beyond what a datetime holds). Never equal to anything, and not encodable."""

    def __repr__(self) -> str:
        return "<unrepresentable timestamp>"


UNREPRESENTABLE = Unrepresentable()
AMQP_LIBRARIES = ("aio_pika", "aiormq")
# What the AMQP libraries log about a broker that cannot be reached or went away. Hookline
# reports those itself (``broker_unreachable``, ``broker_connection_lost``, a CLI error
# line), so these would only say it twice, in another format.
CONNECTION_NOISE = (
    "error when creating transport",
    "Connection attempt to",
    "Reconnect attempt failed",
    "Connection to %s closed",
)


def is_connection_noise(record: logging.LogRecord) -> bool:
    """True for an AMQP library's log record that repeats a connection problem."""
    return record.name.split(".")[0] in AMQP_LIBRARIES and str(record.msg).startswith(
        CONNECTION_NOISE
    )


async def connect(broker: BrokerSettings, name: str) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself) named ``name`` for operators."""
    tolerate_undecodable_properties()
    return await aio_pika.connect_robust(
        broker.connection_url(),
        ssl_context=broker.ssl_context(),
        client_properties={"connection_name": name},
        reconnect_interval=broker.reconnect_interval_s,
    )


def tolerate_undecodable_properties() -> None:
    """Make pamqp decode short strings, timestamps and field tables without raising on
    values it cannot represent. Idempotent; affects every connection in the process."""
    decode.METHODS["shortstr"] = _short_str
    decode.METHODS["timestamp"] = _timestamp_property
    decode.METHODS["table"] = _field_table
    decode.TABLE_MAPPING[b"T"] = _timestamp_field
    decode.TABLE_MAPPING[b"F"] = _field_table


def _short_str(value: bytes) -> tuple[int, str]:
    if not value:
        raise ValueError("Could not unpack short string value")
    length = value[0]
    return length + 1, value[1 : length + 1].decode("utf-8", "replace")


def _timestamp_property(value: bytes) -> tuple[int, datetime | None]:
    if len(value) < 8:
        raise ValueError("Could not unpack timestamp value")
    try:
        return _strict_timestamp(value)
    except (ValueError, OverflowError, OSError):
        # A moment datetime cannot hold: the property is dropped, the message still decodes.
        return 8, None


def _timestamp_field(value: bytes) -> tuple[int, Any]:  # datetime or UNREPRESENTABLE
    if len(value) < 8:
        raise ValueError("Could not unpack timestamp value")
    try:
        return _strict_timestamp(value)
    except (ValueError, OverflowError, OSError):
        return 8, UNREPRESENTABLE


def _field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """pamqp's field table decoder, with keys that are not UTF-8 kept as lone surrogates
    (``surrogateescape``) instead of raising: distinct, and refused by any encoder."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        table: common.FieldTable = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "surrogateescape")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            table[key] = result
        return end, table
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err
