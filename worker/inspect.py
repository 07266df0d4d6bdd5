"""``python -m worker status``: one table of every endpoint, read from the broker.

Queue depths, consumer counts, retry tiers and dead letters come from the broker. Retry
tiers are those of the current ``retry.delays_s`` and, where their queues still hold on,
those of every earlier schedule recorded in the exchange's delay-tier manifest. Circuit
states live in each worker's memory, so they are read from the workers' ``/status.json``
(``--worker URL``, by default this host's metrics port) and shown per worker count.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from producer.connection import connect
from worker import dlq
from worker.retry import delay_tiers
from worker.settings import Settings
from worker.terminal import printable, terminal_json
from worker.topology import (
    delay_label,
    delay_queue,
    endpoint_queue,
    endpoint_queue_names,
    inspect_queues,
    known_delay_tiers,
)

WORKER_TIMEOUT_S = 2.0


@dataclass(slots=True)
class EndpointReport:
    name: str
    queued: int | None
    consumers: int | None
    retry_tiers: dict[str, int | None]
    dead_letters: dict[str, int] = field(default_factory=dict)
    circuits: dict[str, int] = field(default_factory=dict)  # state -> workers in it

    @property
    def circuit(self) -> str:
        if not self.circuits:
            return "unknown"
        if set(self.circuits) == {"closed"}:
            return "closed"
        workers = sum(self.circuits.values())
        return ", ".join(f"{state} {count}/{workers}" for state, count in
                         sorted(self.circuits.items()) if state != "closed")  # fmt: skip


async def gather(
    settings: Settings, worker_urls: list[str], scan_limit: int
) -> tuple[list[EndpointReport], int, int]:
    """Every endpoint's report, and how many dead letters were read of how many."""
    exchange = settings.broker.exchange
    reports = []
    connection = await connect(settings.broker, f"hookline-status {exchange}")
    try:
        configured = set(delay_tiers(settings.retry))
        known = await known_delay_tiers(connection, settings)
        for endpoint in settings.endpoints:
            found = await inspect_queues(
                connection, endpoint_queue_names(settings, endpoint.name, known)
            )
            work = found[endpoint_queue(exchange, endpoint.name)]
            tiers: dict[str, int | None] = {}
            for delay in known:
                tier = found[delay_queue(exchange, endpoint.name, delay)]
                if tier is None and delay not in configured:
                    continue  # an earlier schedule's tier this endpoint never had, or retired
                tiers[delay_label(delay)] = tier[0] if tier is not None else None
            reports.append(EndpointReport(
                name=endpoint.name,
                queued=work[0] if work is not None else None,
                consumers=work[1] if work is not None else None,
                retry_tiers=tiers,
            ))  # fmt: skip
    finally:
        await connection.close()
    counts, scanned, total = await dlq.count_by_endpoint_and_reason(settings, scan_limit)
    by_name = {report.name: report for report in reports}
    for (endpoint_name, reason), count in counts.items():
        if endpoint_name in by_name:
            by_name[endpoint_name].dead_letters[reason] = count
    for states in await asyncio.gather(*(_worker_circuits(url) for url in worker_urls)):
        for name, state in states.items():
            if name in by_name:
                circuits = by_name[name].circuits
                circuits[state] = circuits.get(state, 0) + 1
    return reports, scanned, total


async def _worker_circuits(url: str) -> dict[str, str]:
    """endpoint -> circuit state from one worker; empty if it does not answer."""
    timeout = aiohttp.ClientTimeout(total=WORKER_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url.rstrip("/") + "/status.json") as response,
        ):
            document = await response.json()
        return {e["name"]: e["circuit"] for e in document["endpoints"]}
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
        return {}


def default_worker_urls(settings: Settings) -> list[str]:
    port = settings.metrics.port
    return [f"http://127.0.0.1:{port}"] if port else []


async def run_status(settings: Settings, args: argparse.Namespace) -> int:
    urls = args.worker if args.worker is not None else default_worker_urls(settings)
    reports, scanned, total = await gather(settings, urls, args.scan_limit)
    if args.json:
        document = {
            "exchange": settings.broker.exchange,
            "dead_letters_read": scanned,
            "dead_letters_total": total,
            "endpoints": [{**asdict(report), "circuit": report.circuit} for report in reports],
        }
        print(terminal_json(document, indent=2))
        return 0
    Console(width=max(100, Console().width)).print(render(reports, scanned, total, urls))
    return 0


def render(reports: list[EndpointReport], scanned: int, total: int, urls: list[str]) -> Any:
    table = Table(title=f"Hookline endpoints ({total} dead letters)", title_justify="left")
    for column in ("endpoint", "queued", "consumers", "circuit", "retry tiers", "dead letters"):
        table.add_column(column, justify="right" if column in ("queued", "consumers") else "left")
    for report in reports:
        tiers = " ".join(
            f"{label}:{'-' if count is None else count}"
            for label, count in report.retry_tiers.items()
        )
        dead = ", ".join(f"{reason} {count}" for reason, count in sorted(
            report.dead_letters.items())) or "0"  # fmt: skip
        table.add_row(
            _cell(report.name),
            _number(report.queued),
            _number(report.consumers),
            _cell(report.circuit),
            _cell(tiers),
            _cell(dead),
        )
    if scanned < total:
        table.caption = f"dead letters counted over the first {scanned} of {total}"
    elif not urls:
        table.caption = "circuit unknown: pass --worker http://HOST:PORT"
    return table


def _cell(text: str) -> str:
    """Text for a table cell, shown as it is: dead-letter reasons come from message headers
    and circuit states from workers' answers, so neither may carry terminal controls or rich
    markup (``[link=...]``, ``[bold red]``) that rich would act on."""
    return escape(printable(text))


def _number(value: int | None) -> str:
    return "missing" if value is None else str(value)
