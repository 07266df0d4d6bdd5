"""Scenario (h) "endpoint count": one worker, one RabbitMQ node, N endpoints.

For each N: a fresh exchange ``hl-scale-<pid>-<k>-<N>``, a config with N endpoints (endpoint
``e<i>`` subscribed to ``scale.e<i>``, all pointing at one loopback receiver that counts
deliveries per endpoint by path), then ``python -m worker run`` as a subprocess:

- cold ready: start to ``/readyz`` 200 with nothing declared; worker RSS then; broker (beam.smp)
  RSS growth; queues of the exchange (``rabbitmqctl list_queues``); ``/metrics`` series and
  scrape time (median of 3);
- warm ready: SIGTERM, start again with everything declared;
- delivery: one event to every endpoint (producer SDK, confirms, many in flight), time from
  the last confirm until every endpoint has had its event; worker RSS peak meanwhile;
- reload: one endpoint's URL changed, SIGHUP, time until the worker logs ``config_reloaded``.

Then the worker stops and every queue and exchange of the run is deleted, so runs repeat.
Every phase has a timeout and reports ``failed`` rather than hanging. Loopback only.

    python -m bench.scale --endpoints 100 --endpoints 1000 [--queue-type classic|quorum]
                          [--json out.json] [--timeout-s 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.common import (
    AMQP_URL,
    LogFollower,
    PhaseFailed,
    ReceiverProcess,
    Service,
    broker_rss_mb,
    child_environment,
    delete_all,
    endpoint_count,
    environment,
    logged_at,
    make_workdir,
    phase,
    rabbitmqctl_names,
    rss_mb,
    sample_peak,
    serve_receiver,
    worker_document,
    write_config,
    write_results,
)
from bench.receivers import free_port
from producer import EventSpec, Publisher

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

# Targets at 10,000 endpoints (one worker, one RabbitMQ node): column -> (limit, text).
TARGETS: dict[str, tuple[float, str]] = {
    "cold_ready_s": (60, "<= 60"),
    "warm_ready_s": (20, "<= 20"),
    "rss_idle_mb": (350, "<= 350"),
    "rss_delivering_mb": (450, "<= 450"),
    "broker_growth_mb": (2048, "<= 2,048"),
    "metrics_series": (20_000, "<= 20,000"),
    "scrape_ms": (1000, "<= 1,000"),
    "delivered_after_last_publish_s": (30, "<= 30"),
    "reload_s": (2, "<= 2"),
}
TARGET_AT = 10_000

# (column, heading, format) in table order.
COLUMNS: list[tuple[str, str, str]] = [
    ("endpoints", "endpoints", "{:,}"),
    ("queue_type", "queue type", "{}"),
    ("cold_ready_s", "cold ready s", "{:.1f}"),
    ("warm_ready_s", "warm ready s", "{:.1f}"),
    ("rss_idle_mb", "RSS idle MB", "{:.0f}"),
    ("rss_delivering_mb", "RSS delivering MB", "{:.0f}"),
    ("broker_growth_mb", "broker growth MB", "{:,.0f}"),
    ("queues", "queues", "{:,}"),
    ("metrics_series", "metrics series", "{:,}"),
    ("scrape_ms", "scrape ms", "{:.0f}"),
    ("delivered_after_last_publish_s", "delivered after last publish s", "{:.2f}"),
    ("reload_s", "reload s", "{:.2f}"),
]


@dataclass
class Row:
    """One endpoint count's figures; None where the phase failed (see ``failures``)."""

    endpoints: int
    queue_type: str
    exchange: str
    cold_ready_s: float | None = None
    warm_ready_s: float | None = None
    rss_cold_idle_mb: float | None = None
    rss_idle_mb: float | None = None  # the warm worker, idle after ready
    rss_delivering_mb: float | None = None  # peak while one event per endpoint is delivered
    broker_before_mb: float | None = None
    broker_after_ready_mb: float | None = None
    broker_after_delivery_mb: float | None = None
    broker_growth_mb: float | None = None
    queues: int | None = None
    exchanges: int | None = None
    metrics_series_idle: int | None = None
    scrape_ms_idle: float | None = None
    metrics_series: int | None = None  # after delivery (every endpoint has counted once)
    scrape_ms: float | None = None
    publish_s: float | None = None
    delivered: int | None = None
    duplicates: int | None = None
    delivered_after_last_publish_s: float | None = None
    delivered_total_s: float | None = None
    reload_s: float | None = None
    stop_s: float | None = None
    cleanup_s: float | None = None
    left_behind: int | None = None
    failures: dict[str, str] = field(default_factory=dict)

    def missed(self) -> list[str]:
        """Columns over their target (rows at 10,000 endpoints or more); failed ones too."""
        return [
            column
            for column, (limit, _) in TARGETS.items()
            if (value := getattr(self, column)) is None or value > limit
        ]


# -- the receiver -----------------------------------------------------------------------


class ScaleReceiver(ReceiverProcess):
    """Counts a delivery to each endpoint (signatures are not verified); GET /stats,
    POST /reset."""

    def __init__(self) -> None:
        super().__init__("bench.scale")

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.base}/stats") as response:
            response.raise_for_status()
            result: dict[str, Any] = await response.json()
            return result

    async def reset(self, session: aiohttp.ClientSession) -> None:
        async with session.post(f"{self.base}/reset") as response:
            response.raise_for_status()


async def serve_counting(port: int) -> None:
    seen: set[int] = set()
    state = {"total": 0, "first_at": 0.0, "last_new_at": 0.0}

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        index = int(request.match_info["index"])
        now = time.time()
        state["total"] += 1
        if not state["first_at"]:
            state["first_at"] = now
        if index not in seen:
            seen.add(index)
            state["last_new_at"] = now
        return web.Response(status=204)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"seen": len(seen), **state})

    async def reset(_: web.Request) -> web.Response:
        seen.clear()
        state.update(total=0, first_at=0.0, last_new_at=0.0)
        return web.Response(status=204)

    await serve_receiver(port, hook, [web.get("/stats", stats), web.post("/reset", reset)])


# -- the config and the worker ----------------------------------------------------------


def config_document(
    exchange: str,
    count: int,
    queue_type: str,
    receiver: ScaleReceiver,
    metrics_port: int,
    changed: int | None = None,
) -> dict[str, Any]:
    """N endpoints, e<i> subscribed to scale.e<i>; ``changed`` gets another URL path."""
    return worker_document(
        exchange,
        queue_type,
        metrics={"host": "127.0.0.1", "port": metrics_port},
        endpoints=[
            {
                "name": f"e{i}",
                "url": receiver.url(i, "/v2" if i == changed else ""),
                "events": [f"scale.e{i}"],
                "secret": SECRET,
            }
            for i in range(count)
        ],
    )


async def scrape(
    worker: Service, session: aiohttp.ClientSession, times: int = 3
) -> tuple[int, float]:
    """(sample lines, median scrape ms) of /metrics."""
    durations, series = [], 0
    for _ in range(times):
        started = time.perf_counter()
        async with session.get(
            f"{worker.base}/metrics", timeout=aiohttp.ClientTimeout(total=60)
        ) as response:
            response.raise_for_status()
            text = await response.text()
        durations.append((time.perf_counter() - started) * 1000)
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return series, statistics.median(durations)


# -- one endpoint count -----------------------------------------------------------------


async def deliver(
    row: Row,
    worker: Service,
    receiver: ScaleReceiver,
    session: aiohttp.ClientSession,
    exchange: str,
    timeout_s: float,
) -> None:
    """One event to every endpoint; time from the last confirm until all have arrived."""
    count = row.endpoints
    await receiver.reset(session)
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample_peak(worker.pid, stop_sampling))
    try:
        started = time.time()
        async with Publisher(AMQP_URL, exchange, max_in_flight=256) as publisher:
            await publisher.publish_many(
                EventSpec(f"scale.e{i}", {"endpoint": i}, id=f"scale-{i}") for i in range(count)
            )
        last_confirm = time.time()
        row.publish_s = last_confirm - started
        deadline = time.monotonic() + timeout_s
        while (stats := await receiver.stats(session))["seen"] < count:
            if time.monotonic() > deadline:
                row.delivered = stats["seen"]
                raise PhaseFailed(f"{stats['seen']:,} of {count:,} endpoints had their event")
            if worker.exited():
                raise PhaseFailed(f"the worker exited; see {worker.log}")
            await asyncio.sleep(0.05)
        row.delivered = stats["seen"]
        row.duplicates = stats["total"] - stats["seen"]
        row.delivered_after_last_publish_s = max(0.0, stats["last_new_at"] - last_confirm)
        row.delivered_total_s = stats["last_new_at"] - started
        await asyncio.sleep(0.5)  # what the worker holds right after the last delivery
    finally:
        stop_sampling.set()
        row.rss_delivering_mb = await sampler


async def reload_one(row: Row, worker: Service, config: Path, rewrite: dict[str, Any]) -> float:
    """Rewrite the config with one endpoint's URL changed, SIGHUP, wait for config_reloaded."""
    write_config(config, rewrite)
    follower = LogFollower(worker.log, worker.log_size(), "config_reloaded")
    sent = time.time()
    assert worker.process is not None
    worker.process.send_signal(signal.SIGHUP)
    while not (found := follower.lines()):
        if worker.exited():
            raise PhaseFailed(f"the worker exited; see {worker.log}")
        await asyncio.sleep(0.02)
    line = found[0]
    seen = time.time()
    with contextlib.suppress(KeyError, TypeError, ValueError):
        seen = min(seen, logged_at(line))
    changed = line.get("changed")
    if changed is not None and list(changed) != [f"e{row.endpoints // 2}"]:
        raise PhaseFailed(f"config_reloaded reports changed={changed!r}")
    return max(0.0, seen - sent)


async def run_count(
    count: int,
    queue_type: str,
    ordinal: int,
    receiver: ScaleReceiver,
    session: aiohttp.ClientSession,
    workdir: Path,
    timeout_s: float,
) -> Row:
    exchange = f"hl-scale-{os.getpid()}-{ordinal}-{count}"
    row = Row(count, queue_type, exchange)
    metrics_port = free_port()
    document = config_document(exchange, count, queue_type, receiver, metrics_port)
    config = workdir / f"{exchange}.json"
    write_config(config, document)
    log = workdir / f"{exchange}.log"
    print(f"{count:,} endpoints ({queue_type}), exchange {exchange}, log {log}", flush=True)
    worker = Service.worker(config, metrics_port, log, child_environment())
    try:
        leftovers = await rabbitmqctl_names("queues", exchange)
        if leftovers:
            await phase(row, "pre-clean", delete_all(exchange, document), timeout_s)
        row.broker_before_mb = broker_rss_mb()

        # Cold: nothing declared yet.
        worker.start()
        row.cold_ready_s = await phase(row, "cold ready", worker.wait_ready(session), timeout_s)
        if row.cold_ready_s is None:
            return row
        print(f"  cold ready in {row.cold_ready_s:.1f} s", flush=True)
        await asyncio.sleep(2)
        row.rss_cold_idle_mb = rss_mb(worker.pid)
        row.broker_after_ready_mb = broker_rss_mb()
        queues = await phase(row, "queues", rabbitmqctl_names("queues", exchange), timeout_s)
        row.queues = len(queues) if queues is not None else None
        exchanges = await rabbitmqctl_names("exchanges", exchange)
        row.exchanges = len(exchanges) if exchanges is not None else None
        await worker.stop()

        # Warm: everything declared.
        worker.start()
        row.warm_ready_s = await phase(row, "warm ready", worker.wait_ready(session), timeout_s)
        if row.warm_ready_s is None:
            return row
        print(f"  warm ready in {row.warm_ready_s:.1f} s", flush=True)
        await asyncio.sleep(2)
        row.rss_idle_mb = rss_mb(worker.pid)
        scraped = await phase(row, "metrics (idle)", scrape(worker, session), timeout_s)
        if scraped is not None:
            row.metrics_series_idle, row.scrape_ms_idle = scraped

        await phase(
            row,
            "delivery",
            deliver(row, worker, receiver, session, exchange, timeout_s),
            2 * timeout_s,
        )
        if row.delivered_after_last_publish_s is not None:
            print(
                f"  {row.delivered:,} delivered {row.delivered_after_last_publish_s:.2f} s after "
                f"the last confirm ({row.delivered_total_s:.2f} s in all)",
                flush=True,
            )
        row.broker_after_delivery_mb = broker_rss_mb()
        scraped = await phase(row, "metrics", scrape(worker, session), timeout_s)
        if scraped is not None:
            row.metrics_series, row.scrape_ms = scraped

        rewrite = config_document(
            exchange, count, queue_type, receiver, metrics_port, changed=count // 2
        )
        row.reload_s = await phase(
            row, "reload", reload_one(row, worker, config, rewrite), timeout_s
        )
        if row.reload_s is not None:
            print(f"  reload applied in {row.reload_s:.2f} s", flush=True)
        after = [
            mb for mb in (row.broker_after_ready_mb, row.broker_after_delivery_mb) if mb is not None
        ]
        if row.broker_before_mb is not None and after:
            row.broker_growth_mb = max(after) - row.broker_before_mb
        return row
    finally:
        row.stop_s = await worker.stop()
        started = time.monotonic()
        left = await phase(row, "cleanup", delete_all(exchange, document), timeout_s)
        row.cleanup_s = time.monotonic() - started
        row.left_behind = left
        print(
            f"  stopped in {row.stop_s:.1f} s; cleanup {row.cleanup_s:.1f} s, "
            f"{left if left is not None else '?'} names left",
            flush=True,
        )


# -- the table --------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [
        "| " + " | ".join(heading for _, heading, _ in COLUMNS) + " | vs targets |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]

    def target_row() -> str:
        cells = [f"target at {TARGET_AT:,}", ""]
        cells += [TARGETS[column][1] if column in TARGETS else "" for column, *_ in COLUMNS[2:]]
        return "| " + " | ".join(cells) + " | |"

    shown = False
    for row in rows:
        cells = []
        for column, _, form in COLUMNS:
            value = getattr(row, column)
            if isinstance(value, float) and form.endswith(".0f}") and round(value) == 0:
                value = 0.0  # not "-0" for a growth within noise
            cells.append("failed" if value is None else form.format(value))
        verdict = ""
        if row.endpoints >= TARGET_AT:
            missed = row.missed()
            headings = {column: heading for column, heading, _ in COLUMNS}
            verdict = (
                "all met"
                if not missed
                else "missed: " + ", ".join(headings[column] for column in missed)
            )
        lines.append("| " + " | ".join(cells) + f" | {verdict} |")
        if row.endpoints == TARGET_AT and not shown:
            lines.append(target_row())
            shown = True
    if not shown:
        lines.append(target_row())
    return "\n".join(lines)


async def main_async(args: argparse.Namespace, workdir: Path) -> list[Row]:
    """Every count in turn; configs and worker logs are kept when a phase failed."""
    rows: list[Row] = []
    receiver = ScaleReceiver()
    try:
        async with aiohttp.ClientSession() as session:
            await receiver.start(session)
            for ordinal, count in enumerate(args.endpoints):
                row = await run_count(
                    count, args.queue_type, ordinal, receiver, session, workdir, args.timeout_s
                )
                rows.append(row)
                print(table([row]).splitlines()[2], flush=True)
    finally:
        receiver.stop()
        if args.keep_logs or any(row.failures for row in rows) or len(rows) < len(args.endpoints):
            print(f"configs and worker logs: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description='Scenario (h) "endpoint count": one worker with N endpoints (loopback).',
    )
    parser.add_argument(
        "--endpoints",
        type=endpoint_count,
        action="append",
        metavar="N",
        help="an endpoint count (repeatable)",
    )
    parser.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    parser.add_argument("--json", type=Path, help="write the rows (and targets) here")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        help="per-phase timeout (delivery gets twice this)",
    )
    parser.add_argument(
        "--keep-logs", metavar="DIR", help="keep configs and worker logs in DIR, not a temp dir"
    )
    parser.add_argument("--serve-receiver", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve_receiver is not None:
        asyncio.run(serve_counting(args.serve_receiver))
        return 0
    if not args.endpoints:
        parser.error("give at least one --endpoints N")
    workdir = make_workdir(args.keep_logs, "hookline-scale-")
    rows = asyncio.run(main_async(args, workdir))
    print()
    print(table(rows))
    for row in rows:
        for name, reason in row.failures.items():
            print(f"{row.endpoints:,} endpoints: {name} failed: {reason}")
    if args.json:
        write_results(
            args.json,
            {
                "environment": environment(args.queue_type),
                "targets_at": TARGET_AT,
                "targets": {column: limit for column, (limit, _) in TARGETS.items()},
                "rows": [asdict(row) for row in rows],
            },
        )
    return 1 if any(row.failures for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
