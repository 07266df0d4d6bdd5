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
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlsplit

import aio_pika
import aiohttp
import yaml

from bench.receivers import free_port
from producer import EventSpec, Publisher

try:
    from yaml import CSafeDumper as Dumper
except ImportError:  # pragma: no cover - PyYAML without libyaml
    from yaml import SafeDumper as Dumper  # type: ignore[assignment]

AMQP_URL = os.environ.get("HOOKLINE_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MAX_ENDPOINTS = 20_000
CLEANUP_CHANNELS = 8
T = TypeVar("T")

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


class PhaseFailed(Exception):
    pass


async def phase(row: Row, name: str, work: Awaitable[T], timeout_s: float) -> T | None:
    """Run one phase within ``timeout_s``; on failure record why and return None."""
    try:
        return await asyncio.wait_for(work, timeout_s)
    except TimeoutError:
        row.failures[name] = f"timeout after {timeout_s:g} s"
    except Exception as exc:  # noqa: BLE001 - a failed phase is reported, never raised
        row.failures[name] = f"{exc.__class__.__name__}: {exc}"[:300]
    print(f"  {name}: FAILED ({row.failures[name]})", flush=True)
    return None


# -- /proc ------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MiB, from /proc; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def broker_pid() -> int | None:
    """The local RabbitMQ node's beam.smp (not ``rabbitmqctl status``: minutes with many
    queues)."""
    pgrep = shutil.which("pgrep")
    if pgrep is None:
        return None
    found = subprocess.run(
        [pgrep, "-u", "rabbitmq", "-f", "beam.smp"], capture_output=True, text=True, check=False
    )
    pids = [int(pid) for pid in found.stdout.split()]
    return max(pids, key=lambda pid: rss_mb(pid) or 0.0) if pids else None


def broker_rss_mb() -> float | None:
    pid = broker_pid()
    return rss_mb(pid) if pid is not None else None


# -- the broker's names -----------------------------------------------------------------


def owned(name: str, exchange: str) -> bool:
    """Whether a queue or exchange belongs to this run's exchange (not to a longer one)."""
    return name == exchange or name.startswith(exchange + ".")


def vhost() -> str:
    path = urlsplit(AMQP_URL).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def rabbitmqctl_names(kind: str, exchange: str, timeout_s: float = 300) -> list[str] | None:
    """Names of the run's queues or exchanges (``kind``) by rabbitmqctl; None if it cannot."""
    ctl = shutil.which("rabbitmqctl") or shutil.which("rabbitmqctl", path="/usr/sbin:/sbin")
    if ctl is None:
        return None
    process = await asyncio.create_subprocess_exec(
        ctl,
        "-q",
        "-p",
        vhost(),
        f"list_{kind}",
        "name",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        return None
    if process.returncode != 0:
        return None
    return [name for name in out.decode().splitlines() if owned(name.strip(), exchange)]


def known_names(exchange: str, document: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Without rabbitmqctl: the names the worker declares, by its own naming functions."""
    from worker.settings import settings_from_document
    from worker.topology import exchange_names, queue_names

    settings = settings_from_document(document, Path("scale.yaml"), {})
    return queue_names(settings), exchange_names(exchange)


async def delete_all(exchange: str, document: dict[str, Any]) -> int:
    """Delete every queue and exchange of the run, concurrently on a few channels; return how
    many are left (0, or -1 if they could not be listed afterwards)."""
    queues = await rabbitmqctl_names("queues", exchange)
    exchanges = await rabbitmqctl_names("exchanges", exchange)
    if queues is None or exchanges is None:
        with contextlib.suppress(Exception):
            queues, exchanges = known_names(exchange, document)
    queues = sorted(set(queues or []))
    # The main exchange last: nothing can route into half-deleted topology meanwhile.
    exchanges = sorted(set(exchanges or []) | {exchange}, key=lambda name: name == exchange)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        work: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for name in queues:
            work.put_nowait(("queue", name))

        async def deleter() -> None:
            channel = await connection.channel()
            while not work.empty():
                kind, name = work.get_nowait()
                for attempt in range(3):
                    try:
                        if kind == "queue":
                            await channel.queue_delete(name, if_unused=False, if_empty=False)
                        else:
                            await channel.exchange_delete(name, if_unused=False)
                        break
                    except Exception:  # noqa: BLE001 - reopen the channel and retry
                        if attempt == 2:
                            print(f"  cleanup: could not delete {kind} {name}", flush=True)
                        with contextlib.suppress(Exception):
                            await channel.close()
                        channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.close()

        await asyncio.gather(*(deleter() for _ in range(CLEANUP_CHANNELS)))
        for name in exchanges:
            work.put_nowait(("exchange", name))
        await asyncio.gather(*(deleter() for _ in range(2)))
    left_queues = await rabbitmqctl_names("queues", exchange)
    left_exchanges = await rabbitmqctl_names("exchanges", exchange)
    if left_queues is None or left_exchanges is None:
        return -1
    return len(left_queues) + len(left_exchanges)


# -- the receiver -----------------------------------------------------------------------


class ScaleReceiver:
    """An aiohttp server in a subprocess: POST /e/<i>[/...] counts a delivery to endpoint i
    (signatures are not verified); GET /stats; POST /reset."""

    def __init__(self) -> None:
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, index: int, suffix: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/e/{index}{suffix}"

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.scale", "--serve-receiver", str(self.port)], cwd=ROOT
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await self.stats(session)
                return
            await asyncio.sleep(0.05)
        self.stop()
        raise RuntimeError("the receiver did not start")

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"http://127.0.0.1:{self.port}/stats") as response:
            response.raise_for_status()
            result: dict[str, Any] = await response.json()
            return result

    async def reset(self, session: aiohttp.ClientSession) -> None:
        async with session.post(f"http://127.0.0.1:{self.port}/reset") as response:
            response.raise_for_status()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


async def serve_receiver(port: int) -> None:
    from aiohttp import web

    with contextlib.suppress(ValueError, OSError):  # one socket per endpoint's pool
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
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

    app = web.Application()
    app.router.add_post(r"/e/{index:\d+}", hook)
    app.router.add_post(r"/e/{index:\d+}/{tail:.*}", hook)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


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
    return {
        "broker": {"url": AMQP_URL, "exchange": exchange, "queue_type": queue_type},
        "worker": {"shutdown_timeout_s": 10, "log_format": "json", "log_level": "info"},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "security": {"require_https": False, "allow_private_networks": True},
        "endpoints": [
            {
                "name": f"e{i}",
                "url": receiver.url(i, "/v2" if i == changed else ""),
                "events": [f"scale.e{i}"],
                "secret": SECRET,
            }
            for i in range(count)
        ],
    }


def write_config(path: Path, document: dict[str, Any]) -> None:
    """Atomically, so that a reload never reads half a file. JSON when ``path`` ends in
    ``.json``, as the runs' configs do: the worker reads it in milliseconds where YAML takes
    about a second at 10,000 endpoints (README, Configuration)."""
    if path.suffix == ".json":
        text = json.dumps(document)
    else:
        text = yaml.dump(
            document, Dumper=Dumper, default_flow_style=None, sort_keys=False, width=400
        )
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


class WorkerProcess:
    """``python -m worker run --config PATH``, its stderr/stdout appended to ``log``."""

    def __init__(self, config: Path, metrics_port: int, log: Path) -> None:
        self.config = config
        self.base = f"http://127.0.0.1:{metrics_port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._log_handle: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        environment = {k: v for k, v in os.environ.items() if k != "HOOKLINE_BROKER_URL"}
        self._log_handle = self.log.open("ab")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--config", str(self.config)],
            cwd=ROOT,
            env=environment,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
        )

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    async def wait_ready(self, session: aiohttp.ClientSession) -> float:
        """Seconds from start until /readyz answers 200."""
        while True:
            if self.exited():
                raise PhaseFailed(f"the worker exited; see {self.log}: {self.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(
                    f"{self.base}/readyz", timeout=aiohttp.ClientTimeout(total=2)
                ) as response:
                    if response.status == 200:
                        return time.monotonic() - self.started
            await asyncio.sleep(0.05)

    async def scrape(self, session: aiohttp.ClientSession, times: int = 3) -> tuple[int, float]:
        """(sample lines, median scrape ms) of /metrics."""
        durations, series = [], 0
        for _ in range(times):
            started = time.perf_counter()
            async with session.get(
                f"{self.base}/metrics", timeout=aiohttp.ClientTimeout(total=60)
            ) as response:
                response.raise_for_status()
                text = await response.text()
            durations.append((time.perf_counter() - started) * 1000)
            series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        return series, statistics.median(durations)

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    async def wait_log(self, event: str, offset: int) -> dict[str, Any]:
        """The first JSON log line with ``"event": event`` written after ``offset``."""
        pattern = re.compile(rb'"event":\s*"' + re.escape(event.encode()) + rb'"')
        position, pending = offset, b""
        while True:
            with self.log.open("rb") as handle:
                handle.seek(position)
                chunk = handle.read()
            position += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if pattern.search(line):
                    with contextlib.suppress(ValueError):
                        found: dict[str, Any] = json.loads(line)
                        return found
                    return {}
            if self.exited():
                raise PhaseFailed(f"the worker exited; see {self.log}")
            await asyncio.sleep(0.02)

    async def stop(self, timeout_s: float = 60) -> float:
        """SIGTERM, then SIGKILL after ``timeout_s``; seconds it took to exit."""
        started = time.monotonic()
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(self.process.wait, timeout_s)
                except subprocess.TimeoutExpired:
                    print("  worker did not stop on SIGTERM: killed", flush=True)
                    self.process.kill()
                    await asyncio.to_thread(self.process.wait)
        finally:
            if self._log_handle is not None:
                self._log_handle.close()
                self._log_handle = None
        return time.monotonic() - started

    def tail(self, lines: int = 3) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])[-600:]
        return ""


# -- one endpoint count -----------------------------------------------------------------


async def sample_peak(pid: int, stop: asyncio.Event) -> float:
    peak = 0.0
    while not stop.is_set():
        peak = max(peak, rss_mb(pid) or 0.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    return max(peak, rss_mb(pid) or 0.0)


async def deliver(
    row: Row,
    worker: WorkerProcess,
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


async def reload_one(row: Row, worker: WorkerProcess, rewrite: dict[str, Any]) -> float:
    """Rewrite the config with one endpoint's URL changed, SIGHUP, wait for config_reloaded."""
    write_config(worker.config, rewrite)
    offset = worker.log_size()
    sent = time.time()
    assert worker.process is not None
    worker.process.send_signal(signal.SIGHUP)
    line = await worker.wait_log("config_reloaded", offset)
    seen = time.time()
    with contextlib.suppress(KeyError, TypeError, ValueError):
        logged = datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))
        seen = min(seen, logged.timestamp())
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
    worker = WorkerProcess(config, metrics_port, log)
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
        scraped = await phase(row, "metrics (idle)", worker.scrape(session), timeout_s)
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
        scraped = await phase(row, "metrics", worker.scrape(session), timeout_s)
        if scraped is not None:
            row.metrics_series, row.scrape_ms = scraped

        rewrite = config_document(
            exchange, count, queue_type, receiver, metrics_port, changed=count // 2
        )
        row.reload_s = await phase(row, "reload", reload_one(row, worker, rewrite), timeout_s)
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


def endpoint_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_ENDPOINTS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_ENDPOINTS:,}")
    return value


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
        asyncio.run(serve_receiver(args.serve_receiver))
        return 0
    if not args.endpoints:
        parser.error("give at least one --endpoints N")
    workdir = Path(args.keep_logs or tempfile.mkdtemp(prefix="hookline-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = asyncio.run(main_async(args, workdir))
    print()
    print(table(rows))
    for row in rows:
        for name, reason in row.failures.items():
            print(f"{row.endpoints:,} endpoints: {name} failed: {reason}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "environment": {
                        "python": platform.python_version(),
                        "cpus": os.cpu_count(),
                        "queue_type": args.queue_type,
                    },
                    "targets_at": TARGET_AT,
                    "targets": {column: limit for column, (limit, _) in TARGETS.items()},
                    "rows": [asdict(row) for row in rows],
                },
                indent=2,
            )
        )
        print(f"\nresults: {args.json}")
    return 1 if any(row.failures for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
