"""``python -m worker unrouted ...``: what no endpoint subscribed to, and getting it delivered
once one does."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from worker import unrouted
from worker.cli_args import add_pacing, add_time_filters, add_type_filter
from worker.settings import Settings
from worker.terminal import ReplayOutput, format_table, printable, terminal_json

EXIT_BAD_INPUT = 2
TABLE_HEADER = ("ID", "TYPE", "PUBLISHED AT", "BYTES")


def add_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "unrouted", help="inspect, replay or purge events that matched no endpoint"
    )
    subcommands = parser.add_subparsers(dest="unrouted_command", required=True)
    for name, help_text in (
        ("list", "show events no endpoint subscribed to, oldest first, and their types"),
        ("replay", "publish them again through the exchange (after adding an endpoint)"),
        ("purge", "delete them"),
    ):
        sub = subcommands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, default=Path("config.yaml"))
        add_type_filter(sub)
        add_time_filters(sub, "published")
        if name == "list":
            sub.add_argument("--json", action="store_true", help="one JSON object per line")
        if name == "replay":
            add_pacing(sub, "replayed")
        if name == "purge":
            sub.add_argument("--yes", action="store_true", help="really delete")


def selection(args: argparse.Namespace) -> unrouted.Selection:
    return unrouted.Selection(
        event_type=args.event_type, since=args.since, until=args.until, limit=args.limit
    )


async def run_unrouted(settings: Settings, args: argparse.Namespace) -> int:
    command = args.unrouted_command
    chosen = selection(args)
    if command == "list":
        events = await unrouted.list_unrouted(settings, chosen)
        if args.json:
            for event in events:
                print(terminal_json(asdict(event)))
            return 0
        rows = [(e.event_id, e.event_type, e.published_at, str(e.size_bytes)) for e in events]
        print(format_table(TABLE_HEADER, rows, "unrouted event"))
        for event_type, count in unrouted.count_by_type(events):
            print(f"  {count:>6}  {printable(event_type)}")
    elif command == "replay":
        output = ReplayOutput(args.dry_run)
        with output.progress() as progress:
            report = await unrouted.replay(
                settings,
                chosen,
                rate_per_s=args.rate,
                dry_run=args.dry_run,
                progress=progress,
                on_replayed=lambda event: output.line(
                    event.event_id, f"({printable(event.event_type)})"
                ),
            )
        kept = report.still_unrouted
        notes = [f"{kept} kept: still no endpoint subscribes to them"] if kept else []
        print(output.summary(len(report.replayed), *notes))
    else:
        if not args.yes:
            print("error: purge deletes unrouted events for good; add --yes", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{await unrouted.purge(settings, chosen)} purged")
    return 0
