"""Argument types and filters shared by the operator commands (``dlq``, ``unrouted``,
``status``)."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.settings import TENANT_RE

DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*/\s*([sm])$")
RATE_UNITS_S = {"s": 1, "m": 60}
TIME_HELP = "an ISO time (2026-11-28T10:00:00Z; UTC if no offset) or an age (90s, 15m, 2h, 7d)"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def moment(text: str, now: datetime | None = None) -> datetime:
    """``2026-11-28T10:00:00Z`` (a time without an offset is UTC), or an age: ``90s``,
    ``15m``, ``2h``, ``7d`` (that long before now)."""
    now = now if now is not None else datetime.now(UTC)
    age = DURATION_RE.fullmatch(text.strip())
    if age:
        return now - timedelta(seconds=float(age.group(1)) * DURATION_UNITS_S[age.group(2)])
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {TIME_HELP}") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def rate(text: str) -> float:
    """``50/s`` or ``600/m``, as messages per second. The unit is required: a bare ``20``
    would leave the operator guessing which one it means."""
    match = RATE_RE.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            "must be a positive rate with its unit, such as 20/s or 600/m"
        )
    return float(match.group(1)) / RATE_UNITS_S[match.group(2)]


def tenant(text: str) -> str:
    """A tenant label, as endpoints carry it (``tenant:`` in the config or the API)."""
    if not TENANT_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            "must be 1-128 of [A-Za-z0-9_.:@-], starting with a letter or digit"
        )
    return text


def add_tenant_filter(parser: Any) -> None:
    parser.add_argument(
        "--tenant", type=tenant, metavar="TENANT", help="only this tenant's endpoints"
    )


def add_type_filter(parser: Any) -> None:
    parser.add_argument(
        "--type",
        dest="event_type",
        metavar="TYPE",
        help="only this event type, or a topic pattern (order.*, user.#)",
    )


def add_time_filters(parser: Any, what: str) -> None:
    """``--since`` and ``--until`` (both inclusive), ``--limit``."""
    parser.add_argument(
        "--since", type=moment, metavar="TIME", help=f"{what} at or after: {TIME_HELP}"
    )
    parser.add_argument(
        "--until", type=moment, metavar="TIME", help=f"{what} at or before: {TIME_HELP}"
    )
    parser.add_argument("--limit", type=positive_int, help="at most this many")


def add_pacing(parser: Any, what: str) -> None:
    """``--rate`` and ``--dry-run`` for commands that publish again."""
    parser.add_argument(
        "--rate", type=rate, metavar="N/s", help="at most N per second (or N/m per minute)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help=f"show what would be {what}; change nothing"
    )
