"""``python -m worker``: run the worker and the operator commands."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from worker import dlq
from worker.exceptions import ConfigError, HooklineError, ListenError, TopologyConflict
from worker.logs import configure_logging
from worker.retry import delay_tiers
from worker.service import Worker
from worker.settings import Settings, load_settings
from worker.topology import dead_letter_queue, delay_queue, endpoint_queue

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", type=Path, default=Path("config.yaml"))
        return sub

    command("run", "deliver until SIGTERM or SIGINT")
    command("check-config", "validate the config and print endpoints and bindings")
    dlq_parser = commands.add_parser("dlq", help="inspect, replay or purge dead letters")
    dlq_commands = dlq_parser.add_subparsers(dest="dlq_command", required=True)
    for name, help_text in (
        ("list", "show dead letters"),
        ("replay", "send dead letters back to their endpoint with fresh attempts"),
        ("purge", "delete dead letters"),
    ):
        sub = dlq_commands.add_parser(name, help=help_text)
        sub.add_argument("--config", type=Path, default=Path("config.yaml"))
        sub.add_argument("--endpoint", help="only this endpoint's dead letters")
        sub.add_argument("--limit", type=_positive_int, help="at most this many")
        if name == "purge":
            sub.add_argument("--yes", action="store_true", help="really delete")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.command == "dlq" and args.endpoint is not None:
            settings.endpoint(args.endpoint)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyError:
        print(f"error: {args.config}: no endpoint named {args.endpoint!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    configure_logging(settings.worker)
    if args.command == "check-config":
        print(describe_settings(settings, args.config))
        return 0
    if args.command == "run":
        return run_async(run_worker(settings))
    return run_async(run_dlq(settings, args))


def run_async(main_coroutine: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (it is a dependency on Linux), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main_coroutine)


async def run_worker(settings: Settings) -> int:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.request_stop)
    try:
        await worker.run()
    except (TopologyConflict, ListenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


async def run_dlq(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.dlq_command == "list":
            letters = await dlq.list_dead_letters(
                settings, endpoint=args.endpoint, limit=args.limit
            )
            print(format_table(letters))
        elif args.dlq_command == "replay":
            report = await dlq.replay(settings, endpoint=args.endpoint, limit=args.limit)
            for letter in report.replayed:
                print(f"replayed {letter.event_id} -> {letter.endpoint}")
            print(f"{len(report.replayed)} replayed", end="")
            if report.skipped_unknown_endpoint:
                print(f", {report.skipped_unknown_endpoint} left: endpoint not in config", end="")
            print()
        else:
            if not args.yes:
                print("error: purge deletes dead letters for good; add --yes", file=sys.stderr)
                return EXIT_BAD_INPUT
            purged = await dlq.purge(settings, endpoint=args.endpoint, limit=args.limit)
            print(f"{purged} purged")
    except (HooklineError, OSError) as exc:
        reason = str(exc) if isinstance(exc, HooklineError) else exc.__class__.__name__
        print(f"error: {settings.broker.masked_url}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def format_table(letters: Sequence[dlq.DeadLetter]) -> str:
    header = ("ID", "TYPE", "ENDPOINT", "REASON", "ATTEMPTS", "LAST STATUS", "DEAD-LETTERED AT")
    rows = [header] + [
        (d.event_id, d.event_type, d.endpoint, d.reason, d.attempts, d.last_status,
         d.dead_lettered_at)
        for d in letters
    ]  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    lines.append(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}")
    return "\n".join(lines)


def describe_settings(settings: Settings, path: Path) -> str:
    exchange = settings.broker.exchange
    retry = settings.retry
    lines = [
        f"{path}: OK",
        f"broker:   {settings.broker.masked_url} (exchange {exchange!r}, "
        f"{settings.broker.queue_type} queues)",
        f"retry:    {retry.max_attempts} attempts, delays {list(retry.delays_s)} s, "
        f"no retry on {sorted(retry.no_retry_statuses)}",
        f"security: require_https={settings.security.require_https}, "
        f"allow_private_networks={settings.security.allow_private_networks}",
        f"dead letters: {dead_letter_queue(exchange)}",
        "endpoints:",
    ]
    for endpoint in settings.endpoints:
        lines += [
            f"  {endpoint.name}",
            f"    url:       {endpoint.url}",
            f"    queue:     {endpoint_queue(exchange, endpoint.name)}",
            f"    bindings:  {', '.join(endpoint.events)}",
            f"    secrets:   {len(endpoint.signing_keys)}",
            f"    timeout:   {settings.timeout_for(endpoint)} s, "
            f"max in flight {settings.max_in_flight_for(endpoint)}",
            "    delays:    "
            + ", ".join(
                delay_queue(exchange, endpoint.name, delay).rsplit(".", 1)[-1]
                for delay in delay_tiers(retry)
            ),
        ]
    return "\n".join(lines)
