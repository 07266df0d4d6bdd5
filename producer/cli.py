"""``python -m producer publish``: publish events from the command line, with confirms."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from producer.connection import AMQP_LIBRARIES, is_connection_noise
from producer.envelope import (
    ENVELOPE_KEYS,
    TIMESTAMP_RULE,
    build_body,
    parse_json,
    parse_timestamp,
)
from producer.exceptions import (
    ConfigError,
    HooklineError,
    InvalidEnvelope,
    PublishError,
    error_lines,
)
from producer.publisher import EventSpec, Publisher
from producer.settings import BrokerSettings, load_broker_settings

EXIT_BAD_INPUT = 2
EXIT_NOT_PUBLISHED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m producer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish", help="publish events and print their ids")
    publish.add_argument("--config", type=Path, default=Path("config.yaml"))
    publish.add_argument("--type", dest="event_type", help="event type, e.g. order.created")
    publish.add_argument("--data", help="the event's data as a JSON object")
    publish.add_argument("--id", dest="event_id", help="event id (default: generated)")
    publish.add_argument(
        "--file",
        type=Path,
        help="JSON lines, each {type[, data][, id][, timestamp]}; data defaults to {}, and any "
        "other key is added to the envelope as it is",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        broker = load_broker_settings(args.config)
        events = _events_from_args(args)
    except ConfigError as exc:
        print(error_lines(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    _report_library_errors_briefly()
    return asyncio.run(_publish(broker, events))


def _report_library_errors_briefly() -> None:
    """The AMQP libraries' own errors as one ``warning:`` line each, without their reports
    of a broker that cannot be reached: this command's error line says that."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(lambda record: not is_connection_noise(record))
    handler.setFormatter(logging.Formatter("warning: %(name)s: %(message)s"))
    for name in AMQP_LIBRARIES:
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.setLevel(logging.ERROR)
        library.propagate = False


def _events_from_args(args: argparse.Namespace) -> list[EventSpec]:
    if args.file is not None:
        if args.event_type or args.data or args.event_id:
            raise ConfigError("--file cannot be combined with --type, --data or --id")
        return _read_jsonl(args.file)
    if not args.event_type:
        raise ConfigError("--type is required (or --file)")
    data = _parse_object(args.data or "{}", "--data")
    return [_spec({"type": args.event_type, "data": data, "id": args.event_id}, "--type")]


def _read_jsonl(path: Path) -> list[EventSpec]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"{path}: cannot read the file") from None
    return [
        _spec(_parse_object(line, f"{path}:{number}"), f"{path}:{number}")
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]


def _parse_object(text: str, where: str) -> dict[str, Any]:
    # The worker's own JSON rules, so a line it would refuse is refused here, before publishing.
    try:
        value = parse_json(text)
    except InvalidEnvelope as exc:
        reason = str(exc).removeprefix("body is ")
        raise ConfigError(f"{where}: {reason}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    return value


def _spec(document: dict[str, Any], where: str) -> EventSpec:
    """An event from one line: its ``type``, ``data`` (default ``{}``), optional ``id`` and
    ``timestamp``; any other key goes into the envelope as it is, as the envelope allows."""
    try:
        timestamp = document.get("timestamp")
        if timestamp is not None and not isinstance(timestamp, str):
            raise InvalidEnvelope(TIMESTAMP_RULE)
        spec = EventSpec(
            type=document.get("type", ""),
            data=document.get("data", {}),
            id=document.get("id"),
            # The envelope's rule, not datetime.fromisoformat's wider ISO 8601.
            timestamp=None if timestamp is None else parse_timestamp(timestamp),
            extra={key: value for key, value in document.items() if key not in ENVELOPE_KEYS},
        )
        # Validate every line before connecting, so a bad file publishes nothing.
        build_body(
            spec.type, spec.data, event_id=spec.id, timestamp=spec.timestamp, extra=spec.extra
        )
    except (InvalidEnvelope, TypeError, ValueError) as exc:
        reason = exc if isinstance(exc, InvalidEnvelope) else "not a valid event"
        raise ConfigError(f"{where}: {reason}") from None
    return spec


async def _publish(broker: BrokerSettings, events: list[EventSpec]) -> int:
    try:
        async with Publisher.from_settings(broker) as publisher:
            results = await asyncio.gather(
                *(
                    publisher.publish(
                        spec.type,
                        spec.data,
                        event_id=spec.id,
                        timestamp=spec.timestamp,
                        extra=spec.extra,
                    )
                    for spec in events
                ),
                return_exceptions=True,
            )
    except (HooklineError, OSError) as exc:
        print(f"error: cannot publish to {broker.masked_url}: {_describe(exc)}", file=sys.stderr)
        return EXIT_NOT_PUBLISHED
    failed = 0
    for spec, result in zip(events, results, strict=True):
        if isinstance(result, str):
            print(result)
        else:
            failed += 1
            print(f"error: {spec.type}: not published: {_describe(result)}", file=sys.stderr)
    return EXIT_NOT_PUBLISHED if failed else 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PublishError | ConfigError):
        return str(exc)
    return exc.__class__.__name__
