"""``python -m worker dlq ...``: the dead-letter commands' arguments and output."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from worker import dlq
from worker.cli_args import add_pacing, add_time_filters, add_type_filter
from worker.outcomes import Reason
from worker.settings import Settings
from worker.terminal import (
    ReplayOutput,
    format_table,
    printable,
    progress_bar,
    terminal_json,
)

EXIT_BAD_INPUT = 2
REASONS = tuple(reason.value for reason in Reason)


def reason(text: str) -> str:
    if text not in REASONS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(REASONS)}")
    return text


def add_commands(commands: Any) -> None:
    dlq_parser = commands.add_parser("dlq", help="inspect, replay, export or purge dead letters")
    dlq_commands = dlq_parser.add_subparsers(dest="dlq_command", required=True)
    for name, help_text in (
        ("list", "show dead letters, oldest first (they stay in the queue)"),
        ("replay", "send dead letters back to their endpoint with fresh attempts"),
        ("export", "append dead letters to a JSON-lines file, then remove them"),
        ("purge", "delete dead letters"),
    ):
        sub = dlq_commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, default=Path("config.yaml"))
        sub.add_argument(
            "--endpoint",
            help="only this endpoint's dead letters (by their hookline-endpoint header, so a "
            "removed endpoint's too)",
        )
        sub.add_argument(
            "--reason",
            type=reason,
            metavar="REASON",
            help=f"only this reason: {', '.join(REASONS)}",
        )
        add_type_filter(sub)
        add_time_filters(sub, "dead-lettered")
        if name == "list":
            sub.add_argument("--json", action="store_true", help="one JSON object per line")
        if name == "replay":
            add_pacing(sub, "replayed")
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
        until=args.until,
        limit=args.limit,
    )


async def run_dlq(settings: Settings, args: argparse.Namespace) -> int:
    command = args.dlq_command
    if command == "retire":
        try:
            retired = await dlq.retire(settings, args.endpoint)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{retired.moved} moved to the dead-letter queue (reason endpoint_removed)")
        if retired.lost:
            print(
                f"error: {retired.lost} message(s) reached a queue in the instant after it was "
                "emptied and were deleted with it",
                file=sys.stderr,
            )
            return 1
        return 0
    chosen = selection(args)
    if command == "list":
        letters = await dlq.list_dead_letters(settings, chosen)
        if args.json:
            for letter in letters:
                print(terminal_json(asdict(letter)))
        else:
            print(dead_letters_table(letters))
    elif command == "replay":
        output = ReplayOutput(args.dry_run)
        with output.progress() as progress:
            report = await dlq.replay(
                settings,
                chosen,
                rate_per_s=args.rate,
                dry_run=args.dry_run,
                progress=progress,
                on_replayed=lambda letter: output.line(
                    letter.event_id, f"-> {printable(letter.endpoint)}"
                ),
            )
        skipped = report.skipped_unknown_endpoint
        notes = [f"{skipped} left: endpoint not in config"] if skipped else []
        print(output.summary(len(report.replayed), *notes))
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


TABLE_HEADER = ("ID", "TYPE", "ENDPOINT", "REASON", "ATTEMPTS", "LAST STATUS", "DEAD-LETTERED AT")


def dead_letters_table(letters: list[dlq.DeadLetter]) -> str:
    return format_table(TABLE_HEADER, [_cells(letter) for letter in letters], "dead letter")


def _cells(d: dlq.DeadLetter) -> tuple[str, ...]:
    """A dead letter's table columns, in the order of ``TABLE_HEADER``."""
    shown = (d.event_id, d.event_type, d.endpoint, d.reason, str(d.attempts), d.last_status)
    return (*shown, d.dead_lettered_at)
