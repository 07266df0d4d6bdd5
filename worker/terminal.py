"""Output for an operator's terminal: text from publishers made inert, JSON lines, tables
and progress bars. Ids, types and header values of queued messages come from publishers,
so everything the operator commands print from them passes through :func:`printable`."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# (messages looked at, messages in the queue)
ProgressCallback = Callable[[int, int], None]

# What a publisher could use to drive an operator's terminal or disguise what it shows:
# controls (C0, DEL, C1: escape sequences, CSI), format characters (Cf: bidi overrides and
# isolates, invisible marks), line and paragraph separators, and lone surrogates (which
# cannot even be encoded for printing).
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
NOT_PLAIN_ASCII_RE = re.compile(r"[^\x20-\x7e]")


def printable(text: str) -> str:
    """``text`` safe to show on a terminal: every character in ``UNSAFE_CATEGORIES`` becomes
    a visible escape (``\\x1b``, ``\\u202e``); everything else, other scripts included, stays."""
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


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], noun: str) -> str:
    """Columns padded to their widest cell, every cell made printable, then a count line
    (``3 dead letters``)."""
    lines_of = [tuple(header)] + [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[column]) for row in lines_of) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in lines_of
    ]
    lines.append(f"{len(rows)} {noun}{'s' if len(rows) != 1 else ''}")
    return "\n".join(lines)


class ReplayOutput:
    """What ``dlq replay`` and ``unrouted replay`` print: one line per event as soon as it
    is done (so an interrupted replay has said what it did), then a summary."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.verb = "would replay" if dry_run else "replayed"

    def line(self, event_id: str, where: str) -> None:
        print(f"{self.verb} {printable(event_id)} {where}", flush=True)

    def progress(self) -> AbstractContextManager[ProgressCallback | None]:
        return progress_bar("checking" if self.dry_run else "replaying")

    def summary(self, count: int, *notes: str) -> str:
        return ", ".join(
            [f"{count} {'to replay (dry run)' if self.dry_run else self.verb}", *notes]
        )


@contextmanager
def progress_bar(description: str) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr when it is a terminal; nothing in pipes and logs."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def advance(seen: int, total: int) -> None:
            bar.update(task, completed=seen, total=total)

        yield advance
