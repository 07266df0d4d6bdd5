"""``python -m worker status``: one table of every endpoint, read from the broker.

Queue depths, consumer counts, retry tiers and dead letters come from the broker. Retry
tiers are shared by every endpoint, so they are reported once: those of the current
``retry.delays_s`` and, where their queues still hold on, those of every earlier schedule
recorded in the exchange's delay-tier manifest. Circuit states live in each worker's
memory, so they are read from the workers' ``/status.json`` (``--worker URL``, by default
this host's metrics port) and shown per worker count. A worker lists at most 1,000
endpoints there, those needing attention first (see :func:`worker_circuits` for the ones it
does not list).

``--tenant T`` keeps only the endpoints of tenant ``T``, both among the settings' endpoints
and among those the workers list (they are asked for ``/status.json?tenant=T``, so their
cap applies to that tenant's endpoints alone). Dead letters and retry tiers are shared by
every tenant: their totals stay the exchange's.
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
from worker.exceptions import ManagementUnavailable
from worker.nodes import NodeFiles, read_nodes
from worker.retry import delay_tiers
from worker.settings import Settings
from worker.terminal import printable, terminal_json
from worker.topology import (
    delay_label,
    delay_queue,
    endpoint_queue,
    inspect_queues,
    known_delay_tiers,
)

WORKER_TIMEOUT_S = 2.0


@dataclass(slots=True)
class EndpointReport:
    name: str
    queued: int | None
    consumers: int | None
    tenant: str | None = None
    paused: bool = False  # as the settings say (the config, and the registry if any)
    dead_letters: dict[str, int] = field(default_factory=dict)
    circuits: dict[str, int] = field(default_factory=dict)  # state -> workers in it

    @property
    def state(self) -> str:
        """The circuit, after "paused" when the endpoint is."""
        return f"paused, {self.circuit}" if self.paused else self.circuit

    @property
    def circuit(self) -> str:
        if not self.circuits:
            return "unknown"
        if set(self.circuits) == {"closed"}:
            return "closed"
        workers = sum(self.circuits.values())
        return ", ".join(
            f"{state} {count}/{workers}"
            for state, count in sorted(self.circuits.items())
            if state != "closed"
        )


@dataclass(slots=True)
class StatusReport:
    endpoints: list[EndpointReport]
    # Shared delay tier -> messages waiting in it (None: its queue is missing).
    retry_tiers: dict[str, int | None]
    dead_letters_read: int
    dead_letters_total: int
    # From the management API, when asked for: each node's open files, or why not read.
    nodes: list[NodeFiles] | None = None
    nodes_error: str | None = None


async def gather(
    settings: Settings,
    worker_urls: list[str],
    scan_limit: int,
    management_url: str | None = None,
    tenant: str | None = None,
) -> StatusReport:
    """Every endpoint's report (only ``tenant``'s, if given), the retry tiers, and how many
    dead letters were read of how many."""
    exchange = settings.broker.exchange
    endpoints = [
        endpoint for endpoint in settings.endpoints if tenant is None or endpoint.tenant == tenant
    ]
    connection = await connect(settings.broker, f"hookline-status {exchange}")
    try:
        configured = set(delay_tiers(settings.retry))
        known = await known_delay_tiers(connection, settings)
        found = await inspect_queues(
            connection,
            [
                *(delay_queue(exchange, delay) for delay in known),
                *(endpoint_queue(exchange, endpoint.name) for endpoint in endpoints),
            ],
        )
    finally:
        await connection.close()
    tiers: dict[str, int | None] = {}
    for delay in known:
        tier = found[delay_queue(exchange, delay)]
        if tier is not None or delay in configured:  # an earlier schedule's, since deleted
            tiers[delay_label(delay)] = tier[0] if tier is not None else None
    reports = []
    for endpoint in endpoints:
        work = found[endpoint_queue(exchange, endpoint.name)]
        reports.append(
            EndpointReport(
                name=endpoint.name,
                queued=work[0] if work is not None else None,
                consumers=work[1] if work is not None else None,
                tenant=endpoint.tenant,
                paused=endpoint.paused,
            )
        )
    counts, scanned, total = await dlq.count_by_endpoint_and_reason(settings, scan_limit)
    by_name = {report.name: report for report in reports}
    for (endpoint_name, reason), count in counts.items():
        if endpoint_name in by_name:
            by_name[endpoint_name].dead_letters[reason] = count
    names = list(by_name)
    for states in await asyncio.gather(
        *(worker_circuits(url, names, tenant) for url in worker_urls)
    ):
        for name, state in states.items():
            if name in by_name:
                circuits = by_name[name].circuits
                circuits[state] = circuits.get(state, 0) + 1
    report = StatusReport(reports, tiers, scanned, total)
    if management_url is not None:
        try:
            report.nodes = await read_nodes(management_url)
        except ManagementUnavailable as exc:
            report.nodes_error = str(exc)
    return report


async def worker_circuits(url: str, names: list[str], tenant: str | None = None) -> dict[str, str]:
    """endpoint -> circuit state from one worker; empty if it does not answer. A worker
    lists the endpoints needing attention first, and at most a bounded number. If it listed
    all it runs, the others are not its own and get no state; if it hit its cap, one of
    ``names`` it does not list is closed there (unknown if it counts more circuits not
    closed than it listed). With ``tenant``, the worker is asked for that tenant's
    endpoints only, and its counts are of those."""
    timeout = aiohttp.ClientTimeout(total=WORKER_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(
                url.rstrip("/") + "/status.json",
                params={"tenant": tenant} if tenant is not None else None,
            ) as response,
        ):
            document = await response.json()
        listed = {e["name"]: e["circuit"] for e in document["endpoints"]}
        not_closed = int(document.get("circuits_not_closed", 0))
        running = int(document.get("endpoints_total", len(listed)))
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
        return {}
    if running <= len(listed):
        return listed  # every endpoint it runs is listed: the others are not its own
    # Over its cap: closed, unless it has more circuits not closed than it listed.
    listed_not_closed = sum(1 for state in listed.values() if state != "closed")
    unlisted = "closed" if not_closed <= listed_not_closed else "unknown"
    return {name: listed.get(name, unlisted) for name in names}


def default_worker_urls(settings: Settings) -> list[str]:
    port = settings.metrics.port
    return [f"http://127.0.0.1:{port}"] if port else []


async def run_status(settings: Settings, args: argparse.Namespace) -> int:
    urls = args.worker if args.worker is not None else default_worker_urls(settings)
    tenant: str | None = getattr(args, "tenant", None)
    report = await gather(settings, urls, args.scan_limit, args.management_url, tenant)
    if args.json:
        document: dict[str, Any] = {
            "exchange": settings.broker.exchange,
            "tenant": tenant,
            "dead_letters_read": report.dead_letters_read,
            "dead_letters_total": report.dead_letters_total,
            "retry_tiers": report.retry_tiers,
            "endpoints": [
                {**asdict(endpoint), "circuit": endpoint.circuit} for endpoint in report.endpoints
            ],
        }
        if args.management_url is not None:
            document["broker_nodes"] = (
                None
                if report.nodes is None
                else [{**asdict(node), "warning": node.warning} for node in report.nodes]
            )
            document["broker_nodes_error"] = report.nodes_error
        print(terminal_json(document, indent=2))
        return 0
    console = Console(width=max(100, Console().width))
    console.print(render(report, urls, tenant))
    for line in node_lines(report):
        console.print(_cell(line))
    return 0


def node_lines(report: StatusReport) -> list[str]:
    """One line per broker node read from the management API, warnings first."""
    if report.nodes_error is not None:
        return [f"broker nodes: not read ({report.nodes_error})"]
    lines = []
    for node in sorted(report.nodes or [], key=lambda node: node.warning is None):
        lines.append(f"{'warning' if node.warning else 'ok'}: {node.name}: {node.describe()}")
    return lines


def render(report: StatusReport, urls: list[str], tenant: str | None = None) -> Any:
    tiers = " ".join(
        f"{label}:{'-' if count is None else count}" for label, count in report.retry_tiers.items()
    )
    # Dead letters and retry tiers are the exchange's, whichever tenant is shown.
    table = Table(
        title=f"Hookline endpoints{f' of tenant {_cell(tenant)}' if tenant else ''} "
        f"({report.dead_letters_total} dead letters"
        f"{' across all tenants' if tenant else ''}; "
        f"retries waiting {_cell(tiers) or 'none'})",
        title_justify="left",
    )
    with_tenant = tenant is not None or any(e.tenant is not None for e in report.endpoints)
    columns = ["endpoint", *(["tenant"] if with_tenant else []), "queued", "consumers"]
    for column in (*columns, "circuit", "dead letters"):
        table.add_column(column, justify="right" if column in ("queued", "consumers") else "left")
    for endpoint in report.endpoints:
        dead = ", ".join(
            f"{reason} {count}" for reason, count in sorted(endpoint.dead_letters.items())
        )
        table.add_row(
            _cell(endpoint.name),
            *([_cell(endpoint.tenant or "-")] if with_tenant else []),
            _number(endpoint.queued),
            _number(endpoint.consumers),
            _cell(endpoint.state),
            _cell(dead or "0"),
        )
    if tenant is not None and not report.endpoints:
        table.caption = f"no endpoint has tenant {_cell(tenant)}"
    elif report.dead_letters_read < report.dead_letters_total:
        table.caption = (
            f"dead letters counted over the first {report.dead_letters_read} "
            f"of {report.dead_letters_total}"
        )
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
