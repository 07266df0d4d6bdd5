"""``python -m worker dlq ...``: the dead-letter commands' arguments and output."""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker import dlq
from worker.settings import Settings

EXIT_BAD_INPUT = 2
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:/s)?$")
# What a publisher could use to drive an operator's terminal or disguise what it shows:
# controls (C0, DEL, C1: escape sequences, CSI), format characters (Cf: bidi overrides and
# isolates, invisible marks), line and paragraph separators, and lone surrogates (which
# cannot even be encoded for printing).
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
NOT_PLAIN_ASCII_RE = re.compile(r"[^\x20-\x7e]")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def since_time(text: str, now: datetime | None = None) -> datetime:
    """``2026-11-28T10:00:00Z`` (a time without an offset is UTC), or an age: ``90s``,
    ``15m``, ``2h``, ``7d``."""
    now = now if now is not None else datetime.now(UTC)
    age = DURATION_RE.fullmatch(text.strip())
    if age:
        return now - timedelta(seconds=float(age.group(1)) * DURATION_UNITS_S[age.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            "must be a time such as 2026-11-28T10:00:00Z or an age such as 15m, 2h, 7d"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def rate(text: str) -> float:
    """``50/s`` or ``50``: messages per second."""
    match = RATE_RE.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError("must be a positive rate such as 50/s")
    return float(match.group(1))


def add_commands(commands: Any) -> None:
    dlq_parser = commands.add_parser("dlq", help="inspect, replay, export or purge dead letters")
    dlq_commands = dlq_parser.add_subparsers(dest="dlq_command", required=True)
    for name, help_text in (
        ("list", "show dead letters (they stay in the queue)"),
        ("replay", "send dead letters back to their endpoint with fresh attempts"),
        ("export", "append dead letters to a JSON-lines file, then remove them"),
        ("purge", "delete dead letters"),
    ):
        sub = dlq_commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, default=Path("config.yaml"))
        sub.add_argument("--endpoint", help="only this endpoint's dead letters")
        sub.add_argument("--reason", help="only this hookline-reason (attempts_exhausted, ...)")
        sub.add_argument(
            "--type",
            dest="event_type",
            metavar="TYPE",
            help="only this event type, or a topic pattern (order.*, user.#)",
        )
        sub.add_argument(
            "--since",
            type=since_time,
            metavar="TIME",
            help="dead-lettered at or after: an ISO time or an age (15m, 2h, 7d)",
        )
        sub.add_argument("--limit", type=positive_int, help="at most this many")
        if name == "list":
            sub.add_argument("--json", action="store_true", help="one JSON object per line")
        if name == "replay":
            sub.add_argument("--rate", type=rate, metavar="N/s", help="at most N per second")
            sub.add_argument("--dry-run", action="store_true",
                             help="show what would be replayed; change nothing")  # fmt: skip
        if name == "export":
            sub.add_argument("--file", type=Path, required=True, help="JSON-lines file to append")
        if name == "purge":
            sub.add_argument("--yes", action="store_true", help="really delete")
    retire = dlq_commands.add_parser(
        "retire",
        help="move a removed endpoint's leftover events into the dead-letter queue",
        description="Move what is left in a removed endpoint's queue and delay queues into "
        "the dead-letter queue (reason endpoint_removed), then delete those queues.",
    )
    retire.add_argument("--config", type=Path, default=Path("config.yaml"))
    retire.add_argument("--endpoint", required=True, help="the removed endpoint's name")


def selection(args: argparse.Namespace) -> dlq.Selection:
    return dlq.Selection(
        endpoint=args.endpoint,
        reason=args.reason,
        event_type=args.event_type,
        since=args.since,
        limit=args.limit,
    )


async def run_dlq(settings: Settings, args: argparse.Namespace) -> int:
    command = args.dlq_command
    if command == "retire":
        try:
            moved = await dlq.retire(settings, args.endpoint)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{moved} moved to the dead-letter queue (reason endpoint_removed)")
        return 0
    chosen = selection(args)
    if command == "list":
        letters = await dlq.list_dead_letters(settings, chosen)
        if args.json:
            for letter in letters:
                print(terminal_json(asdict(letter)))
        else:
            print(format_table(letters))
    elif command == "replay":
        with progress_bar("replaying" if not args.dry_run else "checking") as progress:
            report = await dlq.replay(
                settings, chosen, rate_per_s=args.rate, dry_run=args.dry_run, progress=progress
            )
        verb = "would replay" if report.dry_run else "replayed"
        for letter in report.replayed:
            print(f"{verb} {printable(letter.event_id)} -> {printable(letter.endpoint)}")
        summary = f"{len(report.replayed)} {'to replay (dry run)' if report.dry_run else verb}"
        if report.skipped_unknown_endpoint:
            summary += f", {report.skipped_unknown_endpoint} left: endpoint not in config"
        print(summary)
    elif command == "export":
        with progress_bar("exporting") as progress:
            exported = await dlq.export(settings, args.file, chosen, progress=progress)
        print(f"{exported} exported to {args.file}")
    else:
        if not args.yes:
            print("error: purge deletes dead letters for good; add --yes", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{await dlq.purge(settings, chosen)} purged")
    return 0


@contextmanager
def progress_bar(description: str) -> Iterator[dlq.Progress | None]:
    """A rich progress bar on stderr when it is a terminal; nothing in pipes and logs."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def advance(seen: int, total: int) -> None:
            bar.update(task, completed=seen, total=total)

        yield advance


def printable(text: str) -> str:
    """``text`` safe to show on a terminal: every character in ``UNSAFE_CATEGORIES`` becomes
    a visible escape (``\\x1b``, ``\\u202e``); everything else, other scripts included, stays.

    Ids, types and header values of dead letters come from publishers, so they pass through
    this before they are printed."""
    return NOT_PLAIN_ASCII_RE.sub(_escape_unsafe, text)


def _escape_unsafe(match: re.Match[str]) -> str:
    char = match.group()
    if unicodedata.category(char) not in UNSAFE_CATEGORIES:
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def terminal_json(value: Any, indent: int | None = None) -> str:
    """JSON with every character outside printable ASCII escaped (``ensure_ascii``), DEL too,
    which JSON leaves raw: what it prints is still the exact value, and inert on a terminal."""
    return json.dumps(value, ensure_ascii=True, indent=indent).replace("\x7f", "\\u007f")


def _cells(d: dlq.DeadLetter) -> tuple[str, ...]:
    """A dead letter's table columns, in the order of ``format_table``'s header."""
    shown = (d.event_id, d.event_type, d.endpoint, d.reason, d.attempts, d.last_status)
    return (*shown, d.dead_lettered_at)


def format_table(letters: Sequence[dlq.DeadLetter]) -> str:
    header = ("ID", "TYPE", "ENDPOINT", "REASON", "ATTEMPTS", "LAST STATUS", "DEAD-LETTERED AT")
    rows = [header] + [tuple(printable(cell) for cell in _cells(d)) for d in letters]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    lines.append(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}")
    return "\n".join(lines)
