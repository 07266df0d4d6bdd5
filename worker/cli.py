"""``python -m worker``: run the worker and the operator commands."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from producer.exceptions import error_lines
from worker import cli_dlq, cli_unrouted
from worker.cli_args import add_tenant_filter, positive_int
from worker.exceptions import ConfigError, HooklineError, ListenError, TopologyConflict
from worker.inspect import run_status
from worker.logs import configure_logging
from worker.registry import with_registry_endpoints
from worker.retry import delay_tiers
from worker.secretbox import SecretBox
from worker.sendtest import run_send_test
from worker.service import Worker
from worker.settings import Settings, load_settings
from worker.topology import dead_letter_queue, delay_queue, endpoint_queue
from worker.upgrade import run_upgrade

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# How often an interrupted command is cancelled again until it ends.
INTERRUPT_REPEAT_S = 0.1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, default=Path("config.yaml"))
        return sub

    command("run", "deliver until SIGTERM or SIGINT; SIGHUP reloads the config")
    command("check-config", "validate the config and print endpoints and bindings")
    status = command("status", "queue depths, consumers, circuits and dead letters per endpoint")
    status.add_argument(
        "--worker",
        action="append",
        default=None,
        metavar="URL",
        help="a worker's metrics address to read circuit states from "
        "(repeatable; default: this host's metrics.port)",
    )
    status.add_argument(
        "--scan-limit",
        type=positive_int,
        default=10_000,
        help="dead letters to read when counting them by reason",
    )
    status.add_argument(
        "--management-url",
        metavar="URL",
        help="RabbitMQ's management API (http://user:password@host:15672): warn when a "
        "node's open-file limit is low or mostly used",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_tenant_filter(status)
    send_test = command("send-test", "POST a signed hookline.test event to one endpoint")
    send_test.add_argument("--endpoint", required=True, help="the endpoint's name")
    command(
        "upgrade-queues",
        "recreate queues an earlier Hookline declared without today's arguments, keeping "
        "every message (stop the workers first)",
    )
    cli_dlq.add_commands(commands)
    cli_unrouted.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if settings.registry.enabled:
            SecretBox.from_setting(settings.registry.secret_key)
    except ConfigError as exc:
        print(error_lines(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    if settings.registry.enabled and args.command not in ("run", "check-config"):
        try:
            settings = asyncio.run(with_registry_endpoints(settings))
        except HooklineError as exc:
            print(f"warning: {exc}; using the config file's endpoints only", file=sys.stderr)
    named = getattr(args, "endpoint", None)
    if named is not None and named not in {endpoint.name for endpoint in settings.endpoints}:
        if args.command == "send-test":
            print(f"error: {args.config}: no endpoint named {named!r}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.command == "dlq" and args.dlq_command != "retire":
            # Dead letters are selected by their hookline-endpoint header: a removed
            # endpoint's are still there to list, export or purge.
            print(
                f"warning: {args.config}: no endpoint named {named!r}; selecting dead letters "
                "by their hookline-endpoint header",
                file=sys.stderr,
            )
    configure_logging(settings.worker)
    if args.command == "check-config":
        print(describe_settings(settings, args.config))
        return 0
    if args.command == "run":
        return run_async(run_worker(settings, args.config))
    if args.command == "status":
        command = run_status(settings, args)
    elif args.command == "send-test":
        command = run_send_test(settings, args.endpoint)
    elif args.command == "upgrade-queues":
        command = run_upgrade(settings)
    elif args.command == "unrouted":
        command = cli_unrouted.run_unrouted(settings, args)
    else:
        command = cli_dlq.run_dlq(settings, args)
    try:
        return run_async(_until_interrupted(_reporting_errors(settings, command)))
    except KeyboardInterrupt:
        # The broker takes back every message the command held but had not settled.
        print("interrupted: nothing lost; messages not yet handled stay queued", file=sys.stderr)
        return EXIT_INTERRUPTED


async def _until_interrupted(command: Coroutine[Any, Any, int]) -> int:
    """Run a one-shot command; Ctrl-C cancels it and ends in KeyboardInterrupt (exit 130).

    The cancel is repeated until the command ends: on Python 3.11, ``asyncio.wait_for``
    (which aiormq awaits confirms with) drops a cancel that arrives as its inner call
    completes, and a replay would then carry on to its end and exit 0."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(command)
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=INTERRUPT_REPEAT_S)
            if interrupted and not task.done():
                task.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if interrupted:
        raise KeyboardInterrupt
    return task.result()


def run_async(main_coroutine: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (it is a dependency on Linux), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main_coroutine)


async def run_worker(settings: Settings, config_path: Path | None = None) -> int:
    worker = Worker(
        settings,
        load_settings=(lambda: load_settings(config_path)) if config_path is not None else None,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.request_stop)
    loop.add_signal_handler(signal.SIGHUP, worker.request_reload)
    try:
        await worker.run()
    except (TopologyConflict, ListenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


async def _reporting_errors(settings: Settings, command: Coroutine[Any, Any, int]) -> int:
    """Operator commands fail with one line naming the broker, never a traceback."""
    try:
        return await command
    except (HooklineError, OSError) as exc:
        reason = str(exc) if isinstance(exc, HooklineError) else exc.__class__.__name__
        print(f"error: {settings.broker.masked_url}: {reason}", file=sys.stderr)
        return EXIT_FAILED


def describe_settings(settings: Settings, path: Path) -> str:
    exchange = settings.broker.exchange
    retry = settings.retry
    breaker = settings.circuit_breaker
    lines = [
        f"{path}: OK",
        f"broker:   {settings.broker.masked_url} (exchange {exchange!r}, "
        f"{settings.broker.queue_type} queues)",
        f"retry:    {retry.max_attempts} attempts, delays {list(retry.delays_s)} s, "
        f"no retry on {sorted(retry.no_retry_statuses)}",
        f"security: require_https={settings.security.require_https}, "
        f"allow_private_networks={settings.security.allow_private_networks}",
        "circuit:  "
        + (
            f"opens after {breaker.failure_threshold} failures in a row, "
            f"cool-down {breaker.cooldown_s} s up to {breaker.max_cooldown_s} s"
            if breaker.enabled
            else "disabled"
        ),
        f"operational events: {'on' if settings.operational_events.enabled else 'off'}",
        f"dead letters: {dead_letter_queue(exchange)}",
        "delay tiers: "
        + ", ".join(delay_queue(exchange, delay) for delay in delay_tiers(retry))
        + " (shared by every endpoint)",
        "endpoints:",
    ]
    for endpoint in settings.endpoints:
        rate = f"{endpoint.rate_limit_per_s}/s per worker" if endpoint.rate_limit_per_s else "none"
        lines += [
            f"  {endpoint.name}",
            f"    url:       {endpoint.display_url}",
            f"    queue:     {endpoint_queue(exchange, endpoint.name)}",
            f"    bindings:  {', '.join(endpoint.events)}",
            f"    secrets:   {len(endpoint.signing_keys)}",
            f"    timeout:   {settings.timeout_for(endpoint)} s, "
            f"max in flight {settings.max_in_flight_for(endpoint)}",
            f"    rate limit: {rate}",
        ]
    return "\n".join(lines)
