"""The wire format: a JSON object with ``id``, ``type``, ``timestamp`` and ``data``.

Parsing is hand-written rather than a pydantic model because it runs once per delivery
on the worker's hot path and must report *why* a body is invalid without echoing it.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from producer.exceptions import InvalidEnvelope

MAX_ID_LENGTH = 255
# The id travels as the webhook-id HTTP header, so it is limited to printable ASCII; HTTP
# trims a header value's surrounding spaces, so a receiver would verify the signature over a
# different id than was signed: the first and last characters are not spaces.
EVENT_ID_RE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?$")
# Dot-separated words; a word never contains the AMQP topic wildcards.
EVENT_TYPE_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
MAX_TYPE_LENGTH = 255
ENVELOPE_KEYS = frozenset({"id", "type", "timestamp", "data"})
# RFC 3339 section 5.6 ``date-time``, nothing else: ``datetime.fromisoformat`` also takes
# week dates, basic format, date-only and offsets with seconds. ASCII digits only (``\d``
# would match any script's digits). The fraction may be any length; microseconds are kept.
RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
TIMESTAMP_RULE = "timestamp must be an RFC 3339 date-time such as 2026-11-28T12:00:00Z"


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed envelope; the raw body travels alongside it untouched."""

    id: str
    type: str
    timestamp: datetime
    data: dict[str, Any]


class _RefusedJSON(ValueError):
    """JSON the standard library accepts but receivers may not read the same way."""


def _reject_constant(name: str) -> None:
    # NaN and Infinity are not JSON; receivers in other languages would choke on them.
    raise _RefusedJSON("body is not valid JSON: NaN and Infinity are not JSON numbers")


def _finite_float(literal: str) -> float:
    # 1e400 is valid JSON syntax but parses to inf, which no receiver can represent.
    value = float(literal)
    if not math.isfinite(value):
        raise _RefusedJSON("body is not valid JSON: a number is out of the float range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Receivers disagree on duplicate keys (first or last wins), so the event one of them
    # sees could differ from what another, or the signature's author, meant.
    document = dict(pairs)
    if len(document) != len(pairs):
        raise _RefusedJSON("body is not valid JSON: an object has a duplicate key")
    return document


# One decoder, built once: the hooks run inside the C scanner's single pass.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys, parse_constant=_reject_constant, parse_float=_finite_float
)


def parse_json(text: str) -> Any:
    """JSON as every receiver reads it alike: no duplicate keys, no NaN, Infinity or numbers
    beyond the float range; :class:`InvalidEnvelope` says which rule was broken."""
    try:
        return _DECODER.decode(text)
    except _RefusedJSON as exc:
        raise InvalidEnvelope(str(exc)) from None
    except (ValueError, RecursionError):
        raise InvalidEnvelope("body is not JSON") from None


def parse_envelope(body: bytes, max_body_bytes: int) -> Envelope:
    """Validate ``body`` as an envelope or raise :class:`InvalidEnvelope` with the reason."""
    if len(body) > max_body_bytes:
        raise InvalidEnvelope(f"body is {len(body)} bytes, over max_body_bytes={max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEnvelope("body is not UTF-8") from None
    document = parse_json(text)
    if not isinstance(document, dict):
        raise InvalidEnvelope("body is not a JSON object")
    return Envelope(
        id=_check_id(document.get("id")),
        type=_check_type(document.get("type")),
        timestamp=_check_timestamp(document.get("timestamp")),
        data=_check_data(document.get("data")),
    )


def _check_id(value: object) -> str:
    if not isinstance(value, str) or not EVENT_ID_RE.fullmatch(value):
        raise InvalidEnvelope(
            f"id must be a string of 1 to {MAX_ID_LENGTH} printable ASCII characters,"
            " not starting or ending with a space"
        )
    return value


def _check_type(value: object) -> str:
    if (
        not isinstance(value, str)
        or len(value) > MAX_TYPE_LENGTH
        or not EVENT_TYPE_RE.fullmatch(value)
    ):
        raise InvalidEnvelope("type must be dot-separated words of letters, digits, '_' or '-'")
    return value


def _check_timestamp(value: object) -> datetime:
    if not isinstance(value, str):
        raise InvalidEnvelope(TIMESTAMP_RULE)
    return parse_timestamp(value)


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 ``date-time`` (with ``Z`` or a ``±HH:MM`` offset) as an aware datetime,
    or :class:`InvalidEnvelope`. The one timestamp rule of the envelope and the CLI."""
    match = RFC3339_RE.fullmatch(text)
    if match is None:
        raise InvalidEnvelope(TIMESTAMP_RULE)
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    if sign is None:
        zone = UTC
        offset_minutes = 0
    else:
        if int(off_h) > 23 or int(off_m) > 59:
            raise InvalidEnvelope(TIMESTAMP_RULE)
        offset_minutes = (int(off_h) * 60 + int(off_m)) * (-1 if sign == "-" else 1)
        zone = timezone(timedelta(minutes=offset_minutes))
    micro = int(fraction[:6].ljust(6, "0")) if fraction else 0
    seconds = int(second)
    if seconds == 60:
        # A leap second exists only as 23:59:60 UTC; datetime cannot hold it, so it is kept
        # as the last microsecond before the next minute.
        if (int(hour) * 60 + int(minute) - offset_minutes) % 1440 != 1439:
            raise InvalidEnvelope(TIMESTAMP_RULE)
        seconds, micro = 59, 999_999
    try:
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), seconds, micro, zone
        )
    except ValueError:
        # Out-of-range fields: month 13, February 30, hour 24, year 0.
        raise InvalidEnvelope(TIMESTAMP_RULE) from None


def _check_data(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidEnvelope("data must be a JSON object")
    return value


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def build_body(
    event_type: str,
    data: dict[str, Any],
    *,
    event_id: str | None = None,
    timestamp: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, bytes]:
    """Serialise a new event; returns its id and the body bytes to publish.

    ``extra`` adds top-level keys beside the four of the envelope (which it cannot
    replace): receivers see them, and the worker forwards the body unchanged.
    """
    event_id = event_id if event_id is not None else new_event_id()
    moment = timestamp if timestamp is not None else datetime.now(UTC)
    if moment.tzinfo is None:
        raise InvalidEnvelope("timestamp must carry a UTC offset")
    stamp = moment.isoformat().replace("+00:00", "Z")
    # An offset with seconds (or a tzinfo that gives none) would not be RFC 3339.
    parse_timestamp(stamp)
    reserved = set(extra or {}) & ENVELOPE_KEYS
    if reserved:
        raise InvalidEnvelope(f"extra keys cannot replace the envelope's {sorted(reserved)}")
    document = {
        **(extra or {}),
        "id": _check_id(event_id),
        "type": _check_type(event_type),
        "timestamp": stamp,
        "data": _check_data(data),
    }
    try:
        text = json.dumps(document, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        # Values JSON cannot hold (NaN, sets, objects): the caller's data, named by kind.
        raise InvalidEnvelope(f"data cannot be written as JSON: {exc.__class__.__name__}") from None
    return event_id, text.encode()
