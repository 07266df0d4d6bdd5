"""The wire format: a JSON object with ``id``, ``type``, ``timestamp`` and ``data``.

Parsing is hand-written rather than a pydantic model because it runs once per delivery
on the worker's hot path and must report *why* a body is invalid without echoing it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from producer.exceptions import InvalidEnvelope

MAX_ID_LENGTH = 255
# The id travels as the webhook-id HTTP header, so it is limited to printable ASCII.
EVENT_ID_RE = re.compile(r"^[\x20-\x7e]{1,255}$")
# Dot-separated words; a word never contains the AMQP topic wildcards.
EVENT_TYPE_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
MAX_TYPE_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed envelope; the raw body travels alongside it untouched."""

    id: str
    type: str
    timestamp: datetime
    data: dict[str, Any]


def _reject_constant(name: str) -> None:
    # NaN and Infinity are not JSON; receivers in other languages would choke on them.
    raise ValueError(f"{name} is not valid JSON")


def parse_envelope(body: bytes, max_body_bytes: int) -> Envelope:
    """Validate ``body`` as an envelope or raise :class:`InvalidEnvelope` with the reason."""
    if len(body) > max_body_bytes:
        raise InvalidEnvelope(f"body is {len(body)} bytes, over max_body_bytes={max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEnvelope("body is not UTF-8") from None
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidEnvelope("body is not JSON") from None
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
            f"id must be a string of 1 to {MAX_ID_LENGTH} printable ASCII characters"
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
        raise InvalidEnvelope("timestamp must be an RFC 3339 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidEnvelope("timestamp must be an RFC 3339 string") from None
    if parsed.tzinfo is None:
        raise InvalidEnvelope("timestamp must be an RFC 3339 string with a UTC offset")
    return parsed


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
) -> tuple[str, bytes]:
    """Serialise a new event; returns its id and the body bytes to publish."""
    event_id = event_id if event_id is not None else new_event_id()
    moment = timestamp if timestamp is not None else datetime.now(UTC)
    if moment.tzinfo is None:
        raise InvalidEnvelope("timestamp must carry a UTC offset")
    document = {
        "id": _check_id(event_id),
        "type": _check_type(event_type),
        "timestamp": moment.isoformat().replace("+00:00", "Z"),
        "data": _check_data(data),
    }
    return event_id, json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
