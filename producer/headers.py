"""Every ``hookline-*`` AMQP header: its name, and the one reader or writer of each.

Publishers control every header a message arrives with (``hookline-*`` ones included), so
each reader here is total: it returns a safe value for any input and never raises.

Headers Hookline writes (public contract):

- ``hookline-mandatory: "1"``: set by the SDK, so that an event no endpoint subscribes to
  is returned to the publisher instead of being kept in ``<exchange>.unrouted``.
- ``hookline-published-at``: when the event was first published, in milliseconds since the
  Unix epoch (set by the SDK; on events from other publishers, the worker sets the time of
  the first attempt on its retry copies; ``dlq replay`` sets the time of the replay).
  ``webhook_end_to_end_seconds`` is measured from it.
- ``hookline-attempts``: attempts already made (on retry copies and dead letters).
- ``hookline-retry-delay``: on a retry copy, the delay tier it waits in (``30s``): the
  delay exchange routes on it.
- ``hookline-handler-errors``: how many times the worker itself failed on the message.
- ``hookline-routing-key``: on an event in ``<exchange>.unrouted`` that an operator command
  put back as a fresh copy, the routing key it was first published with.
- ``hookline-dropped-headers``: names of publisher headers that could not be copied
  losslessly into a retry or dead-letter copy and were left out (comma-separated).
- Dead letters only: ``hookline-endpoint``, ``hookline-reason``, ``hookline-last-status``,
  ``hookline-dead-lettered-at`` (RFC 3339, UTC) and ``hookline-detail``.

Headers the broker writes and Hookline only reads: ``x-delivery-count`` (how often a quorum
queue took the message back) and ``x-death`` (where and why the broker dead-lettered it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pamqp import decode, encode

MANDATORY = "hookline-mandatory"
# On a fresh copy in ``<exchange>.unrouted``: the routing key the event was published with.
ROUTING_KEY = "hookline-routing-key"
PUBLISHED_AT = "hookline-published-at"
ATTEMPTS = "hookline-attempts"
HANDLER_ERRORS = "hookline-handler-errors"
DROPPED_HEADERS = "hookline-dropped-headers"
ENDPOINT = "hookline-endpoint"
REASON = "hookline-reason"
LAST_STATUS = "hookline-last-status"
DEAD_LETTERED_AT = "hookline-dead-lettered-at"
DETAIL = "hookline-detail"
RETRY_DELAY = "hookline-retry-delay"
# Written by RabbitMQ.
DELIVERY_COUNT = "x-delivery-count"
DEATHS = "x-death"

# Prefixes of headers that are never carried into copies: the broker's own (RabbitMQ drops
# a message whose copied ``x-death`` says it went round a dead-letter loop) and Hookline's
# state, which every copy writes afresh.
NOT_CARRIED_PREFIXES = ("x-", "hookline-")
# RabbitMQ's sender-selected distribution: extra routing keys. Never carried into a copy: a
# retry leaves its delay tier through a direct exchange where each endpoint queue is bound by
# its name, and a copied ``CC`` would deliver the event to an endpoint that never subscribed.
ROUTING_HEADERS = frozenset({"cc", "bcc"})
MAX_COUNT = 1_000_000
MAX_DETAIL_CHARS = 512
MAX_DROPPED_NAMES_CHARS = 512
EARLIEST_PUBLISH_MS = 1_577_836_800_000  # 2020-01-01: anything earlier is not a publish time
MAX_CLOCK_SKEW_MS = 300_000


def read_count(headers: Mapping[str, Any] | None, name: str) -> int:
    """A non-negative counter header (``hookline-attempts``, ``hookline-handler-errors``).

    Anything that is not a whole number (floats that are not integral, infinities, NaN,
    decimals, junk strings, tables) reads as 0; huge values are capped at ``MAX_COUNT``.
    """
    value = (headers or {}).get(name, 0)
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    if isinstance(value, str):
        value = value.strip()
        if not (value.isascii() and value.isdigit() and len(value) <= 7):
            return 0
        return min(int(value), MAX_COUNT)
    if isinstance(value, bool):
        return 0
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return 0
        value = int(value)
    if isinstance(value, int):
        return max(0, min(value, MAX_COUNT))
    return 0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def published_at_ms(headers: Mapping[str, Any] | None) -> int | None:
    """``hookline-published-at``, or None if absent or not a plausible time in milliseconds
    (a publisher may send anything)."""
    value = (headers or {}).get(PUBLISHED_AT)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if EARLIEST_PUBLISH_MS <= value <= now_ms() + MAX_CLOCK_SKEW_MS else None


def attempts_made(headers: Mapping[str, Any] | None) -> int:
    """Attempts already made, from our own header (``x-death`` counts are not reliable)."""
    return read_count(headers, ATTEMPTS)


def delivery_count(headers: Mapping[str, Any] | None) -> int:
    """How many times a quorum queue has taken the message back (``x-delivery-count``);
    0 when the header is missing or is not a whole number."""
    return read_count(headers, DELIVERY_COUNT)


@dataclass(frozen=True, slots=True)
class Death:
    """One entry of the broker's ``x-death``: the queue it left, why, and when."""

    queue: str
    reason: str
    time: datetime | None
    routing_key: str = ""  # the first the message had when it left ``queue``


def deaths(headers: Mapping[str, Any] | None) -> list[Death]:
    """The broker's dead-lettering history (``x-death``), most recent first.

    Publishers can set ``x-death`` themselves on RabbitMQ 3.x, so anything that is not a
    list of tables reads as no history, and malformed entries are skipped.
    """
    history = (headers or {}).get(DEATHS)
    if not isinstance(history, list | tuple):
        return []
    found = []
    for entry in history:
        if not isinstance(entry, dict):
            continue
        moment = entry.get("time")
        if isinstance(moment, datetime) and moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # AMQP timestamps are UTC
        keys = entry.get("routing-keys")
        found.append(
            Death(
                queue=text(entry.get("queue")),
                reason=text(entry.get("reason")),
                time=moment if isinstance(moment, datetime) else None,
                routing_key=text(keys[0]) if isinstance(keys, list | tuple) and keys else "",
            )
        )
    return found


def text(value: Any) -> str:
    """A header value as text for display and matching; never raises."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a value whose str() fails is shown by its type
        return f"<{type(value).__name__}>"


def carried(headers: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The publisher's own headers for a copy, and the names of those left out.

    ``x-`` and ``hookline-`` headers are never carried, nor ``CC`` and ``BCC`` (extra
    routing keys, see :data:`ROUTING_HEADERS`). Every other value must survive
    AMQP re-encoding unchanged: the client re-encodes some types differently from how they
    arrived (a 64-bit float goes out as 32 bits, a millisecond timestamp loses its
    milliseconds, a string that is not UTF-8 cannot go out as a string at all). Such a value
    would change silently or make the publish fail, so it is left out and named instead.
    Strings that are not UTF-8 travel as byte arrays, with the same bytes.
    """
    return _copyable(headers, NOT_CARRIED_PREFIXES)


def _copyable(
    headers: Mapping[str, Any] | None, skipped_prefixes: tuple[str, ...]
) -> tuple[dict[str, Any], list[str]]:
    """Headers whose names do not start with ``skipped_prefixes`` and that survive
    re-encoding (kept), and the names of those that do not (dropped). Routing headers are
    never kept."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or name.lower().startswith(skipped_prefixes):
            continue
        if name.lower() in ROUTING_HEADERS:
            continue
        portable = _portable(value)
        if _survives_reencoding(name, portable):
            kept[name] = portable
        else:
            dropped.append(name)
    return kept, dropped


def _portable(value: Any) -> Any:
    # pamqp decodes a long string that is not UTF-8 as bytes, but only encodes bytearray.
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {key: _portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_portable(item) for item in value]
    return value


def _survives_reencoding(name: str, value: Any) -> bool:
    try:
        encode.short_string(name)
        _, decoded = decode.embedded_value(encode.encode_table_value(value))
    except Exception:  # noqa: BLE001 - any failure to encode means "cannot be carried"
        return False
    return _same(decoded, value)


def _same(left: Any, right: Any) -> bool:
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(
            _same(a, b) for a, b in zip(left, right, strict=True)
        )
    return bool(left == right)


def with_dropped(
    headers: dict[str, Any], earlier: Mapping[str, Any] | None, dropped: list[str]
) -> None:
    """Record in ``headers`` which publisher headers were left out, now or by an earlier copy."""
    names = [name for name in text((earlier or {}).get(DROPPED_HEADERS)).split(",") if name]
    names += [printable_name(name) for name in dropped if printable_name(name) not in names]
    if names:
        headers[DROPPED_HEADERS] = ",".join(names)[:MAX_DROPPED_NAMES_CHARS]


def printable_name(name: str) -> str:
    """A header name fit for a note: printable ASCII, commas escaped, bounded."""
    safe = "".join(c if " " < c <= "~" and c != "," else f"\\x{ord(c):02x}" for c in name[:64])
    return safe if len(name) <= 64 else f"{safe}..."


def dropped_note(headers: Mapping[str, Any]) -> str:
    """The sentence a dead letter's ``hookline-detail`` ends with when headers were left out."""
    names = text(headers.get(DROPPED_HEADERS))
    return f" [headers left out of copies, not re-encodable: {names}]" if names else ""


def retry_headers(
    original: Mapping[str, Any] | None, *, attempts: int, handler_errors: int, tier: str
) -> dict[str, Any]:
    """Headers of a retry copy waiting in delay tier ``tier``. It keeps the first publish
    time, or records the first attempt's as the best known for an event published without
    one."""
    headers, dropped = carried(original)
    headers[PUBLISHED_AT] = published_at_ms(original) or now_ms()
    headers[ATTEMPTS] = attempts
    headers[RETRY_DELAY] = tier
    if handler_errors:
        headers[HANDLER_ERRORS] = handler_errors
    with_dropped(headers, original, dropped)
    return headers


def dead_letter_headers(
    original: Mapping[str, Any] | None,
    *,
    endpoint: str,
    reason: str,
    attempts: int,
    last_status: str,
    detail: str,
    handler_errors: int = 0,
    dead_lettered_at: datetime | None = None,
) -> dict[str, Any]:
    """Headers of a dead-letter copy: the publisher's headers plus why it ended there.

    ``dead_lettered_at`` is now unless the message was dead-lettered earlier (by the broker,
    whose ``x-death`` says when).
    """
    headers, dropped = carried(original)
    with_dropped(headers, original, dropped)
    published = published_at_ms(original)
    if published is not None:
        headers[PUBLISHED_AT] = published
    headers.update(
        {
            ENDPOINT: endpoint,
            REASON: reason,
            ATTEMPTS: attempts,
            LAST_STATUS: last_status,
            DEAD_LETTERED_AT: (dead_lettered_at or datetime.now(UTC)).isoformat(timespec="seconds"),
            DETAIL: detail[:MAX_DETAIL_CHARS] + dropped_note(headers),
        }
    )
    if handler_errors:
        headers[HANDLER_ERRORS] = handler_errors
    return headers


def replay_headers(original: Mapping[str, Any] | None) -> dict[str, Any]:
    """Headers of a replayed dead letter: the publisher's, with fresh attempts, published
    now (so end-to-end latency is the replay's, not the time spent dead-lettered)."""
    headers, dropped = carried(original)
    with_dropped(headers, original, dropped)
    headers[PUBLISHED_AT] = now_ms()
    return headers


def without_broker_headers(original: Mapping[str, Any] | None) -> dict[str, Any]:
    """Headers of a message moved between Hookline's own queues (a dead letter replaced by
    a fresh copy, a message carried over by ``upgrade-queues``): all of them, ``hookline-*``
    included, except the broker's ``x-`` ones. A copied ``x-death`` makes RabbitMQ drop the
    message as a dead-letter loop, and a copied ``x-delivery-count`` would mean nothing.
    Values that would not survive re-encoding are left out and named, as in :func:`carried`.
    """
    kept, dropped = _copyable(original, ("x-",))
    with_dropped(kept, original, dropped)
    return kept
