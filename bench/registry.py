"""Scenario (j) "registry": the control-plane API and two workers following the registry.

Everything runs on this machine against the local PostgreSQL and RabbitMQ, loopback only:

- a fresh PostgreSQL schema ``hl_bench_<pid>_<hex>`` (``?search_path=`` in the URL), migrated
  with ``python -m api migrate``, an admin key from ``python -m api create-key --admin``;
- a fresh exchange ``hl-reg-<pid>-<hex>`` (classic queues unless ``--queue-type quorum``);
- a receiver subprocess (aiohttp) that counts deliveries and records the probe events;
- the API as a subprocess (``python -m api --config api.json``), so that the client's own CPU
  is not the server's, and two workers (``python -m worker run --config worker-<k>.json``)
  with the registry section; ``HOOKLINE_SECRET_KEY`` is in their environment only.

Phases, each bounded by a timeout (a failed phase is reported, never hangs):

1. registration: N endpoints created through the API, ``--concurrency`` (32) requests at a
   time, while both workers run. Reported: creates per second, the creates' latency under
   that concurrency, and the time from the first create until every endpoint is consumed
   by both workers: the broker reports two consumers on every endpoint queue (passive
   declarations, polled) and both workers' ``/readyz`` answer 200 with the registry's count
   at N. Worker RSS at peak during registration and idle afterwards. A create answered 503
   (the broker or the database away) is retried for up to 2 minutes and counted in
   ``register_retries``.
2. API latency with N endpoints registered: GET one endpoint (random names), GET the list
   (limit 100, from a random cursor), POST a new endpoint; one request at a time, so the
   figures are service times, not queueing. The workers keep running (each create makes
   both apply it), on the same CPUs here. A 503 is counted in ``latency_errors`` and fails
   the phase; the other requests' figures are kept. Targets: p99 <= 50 ms each at 10,000.
3. change propagation: ``--changes`` (100) PATCHes, one at a time, each moving a random
   endpoint's URL to a new path on the receiver. For each, the time from the API's answer
   until *both* workers have applied it, from the ``config_reloaded`` line each worker logs
   once its new consumer runs (wall-clock timestamps, same host; PostgreSQL notifies at
   commit, so a worker may apply a change before the client has read the answer, and a
   figure may then be slightly negative). From then on an event
   goes to the new URL whichever worker takes it; the run checks that, with probe events
   published every 20 ms from the answer on: none published after both workers applied
   the change may reach the old URL (``stale``). Also reported: the time until the first
   probe reached the new URL (end to end, including the delivery). Target: p99 <= 1 s.
4. cold start: one worker stopped and started again with every endpoint in the registry;
   time to ``/readyz`` 200 and its RSS.

CPU seconds of every process (API, workers, RabbitMQ, PostgreSQL, this client) are taken per
phase, which shows where the time goes. The API or a worker logging that the broker or the
database went away during a phase, or RabbitMQ's process changing, is listed under
``disturbances``: that phase's figures are not comparable with a quiet run's. Afterwards
every process of the run stops, every queue and exchange of the run's exchange is deleted
and the schema dropped; configs and logs are kept when a phase failed.

    python -m bench.registry [--endpoints 10000] [--changes 100] [--concurrency 32]
                             [--requests K] [--queue-type classic|quorum] [--json out.json]
                             [--timeout-s 900] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import random
import resource
import secrets
import shlex
import shutil
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import asyncpg
from aiohttp import web

from bench.common import (
    AMQP_URL,
    ROOT,
    LogFollower,
    PhaseFailed,
    ReceiverProcess,
    Service,
    broker_pid,
    child_environment,
    delete_all,
    endpoint_count,
    environment,
    failure,
    logged_at,
    make_workdir,
    pgrep,
    phase,
    registry_count,
    rss_mb,
    run_process,
    sample_peak,
    serve_receiver,
    worker_document,
    write_config,
    write_results,
)
from bench.receivers import free_port
from producer import Publisher
from worker.secretbox import generate_key
from worker.topology import endpoint_queue

DATABASE_URL = os.environ.get(
    "HOOKLINE_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
GET_SAMPLES = 500
LIST_SAMPLES = 200
CREATE_SAMPLES = 200
PROBE_INTERVAL_S = 0.02
CHANGE_TIMEOUT_S = 15.0
CHECK_CHANNELS = 16
RETRY_503_FOR_S = 120.0
# What the processes of the run log when the broker or the database went away meanwhile.
DISTURBANCES = frozenset(
    {
        "broker_connection_lost",
        "broker_unreachable",
        "registry_unavailable",
        "api_broker_unavailable",
        "api_database_unavailable",
        "consumer_cancel_failed",
        "config_reload_failed",
    }
)
WORKERS = 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")

# Targets at 10,000 endpoints: figure -> (limit, text).
TARGETS: dict[str, tuple[float, str]] = {
    "create_p99_ms": (50, "<= 50"),
    "get_p99_ms": (50, "<= 50"),
    "list_p99_ms": (50, "<= 50"),
    "propagation_p99_s": (1.0, "<= 1"),
}
TARGET_AT = 10_000


@dataclass
class Figures:
    """The run's figures; None where the phase failed (see ``failures``)."""

    endpoints: int
    changes: int
    queue_type: str
    concurrency: int
    exchange: str
    schema: str
    # 1. registration (while both workers run)
    registered: int | None = None
    register_s: float | None = None
    register_per_s: float | None = None
    register_create_p50_ms: float | None = None  # under --concurrency requests at a time
    register_create_p99_ms: float | None = None
    register_retries: dict[str, int] = field(default_factory=dict)
    ready_after_first_create_s: float | None = None
    ready_after_last_create_s: float | None = None
    ready_check_pass_s: float | None = None  # how long one full broker check took
    queues_with_both_consumers: int | None = None
    worker_rss_peak_registering_mb: list[float] = field(default_factory=list)
    worker_rss_ready_mb: list[float] = field(default_factory=list)
    api_rss_mb: float | None = None
    # 2. API latency, one request at a time, with N endpoints registered
    get_p50_ms: float | None = None
    get_p99_ms: float | None = None
    list_p50_ms: float | None = None
    list_p99_ms: float | None = None
    create_p50_ms: float | None = None
    create_p99_ms: float | None = None
    api_cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    latency_errors: dict[str, int] = field(default_factory=dict)  # 503s, not in the figures
    # 3. change propagation: answer -> both workers applied (their logs)
    propagation_p50_s: float | None = None
    propagation_p99_s: float | None = None
    propagation_max_s: float | None = None
    first_worker_p50_s: float | None = None
    first_worker_p99_s: float | None = None
    first_at_new_url_p50_s: float | None = None  # answer -> first probe delivered there
    first_at_new_url_p99_s: float | None = None
    first_at_new_url_max_s: float | None = None
    patch_p50_ms: float | None = None
    patch_p99_ms: float | None = None
    probes_published: int | None = None
    probes_to_old_url_after_answer: int | None = None
    stale_after_applied: int | None = None  # must be 0
    propagation: list[dict[str, Any]] = field(default_factory=list)
    # 4. cold start of one worker with every endpoint in the registry
    cold_start_s: float | None = None
    cold_start_rss_mb: float | None = None
    registry_endpoints_metric: list[float | None] = field(default_factory=list)
    # CPU seconds per phase and process
    cpu_s: dict[str, dict[str, float]] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)
    cleanup_left_behind: int | None = None
    # The broker or the database away during a phase (logged by the API or a worker), or
    # RabbitMQ restarted: that phase's figures are not comparable with a quiet run's.
    disturbances: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)

    def missed(self) -> list[str]:
        return [
            name
            for name, (limit, _) in TARGETS.items()
            if (value := getattr(self, name)) is None or value > limit
        ]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least ``fraction`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def p50_p99(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return round(percentile(values, 0.50), 3), round(percentile(values, 0.99), 3)


# -- processes --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU of a process, from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds per labelled group of processes between :meth:`start` and :meth:`stop`
    (a process that is not there at both ends is not counted)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self._groups = groups
        self._before: dict[str, dict[int, float]] = {}
        self._self_before = resource.getrusage(resource.RUSAGE_SELF)

    def _read(self) -> dict[str, dict[int, float]]:
        beam = broker_pid()
        groups = {
            **self._groups,
            "postgres": pgrep("postgres"),
            "broker": [beam] if beam is not None else [],
        }
        return {
            label: {pid: cpu for pid in pids if (cpu := cpu_seconds(pid)) is not None}
            for label, pids in groups.items()
        }

    def start(self) -> None:
        self._before = self._read()
        self._self_before = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self) -> dict[str, float]:
        used = {}
        for label, pids in self._read().items():
            before = self._before.get(label, {})
            used[label] = round(
                sum(cpu - before[pid] for pid, cpu in pids.items() if pid in before), 2
            )
        now, then = resource.getrusage(resource.RUSAGE_SELF), self._self_before
        used["bench client"] = round(now.ru_utime + now.ru_stime - then.ru_utime - then.ru_stime, 2)
        return used


def disturbances(log: Path, offset: int) -> Counter[str]:
    """Lines about the broker or the database going away written to ``log`` after
    ``offset``, counted by event."""
    with contextlib.suppress(OSError):
        lines = LogFollower(log, offset, *DISTURBANCES).lines()
        return Counter(event for line in lines if (event := line.get("event")) in DISTURBANCES)
    return Counter()


async def run_cli(args: list[str], env: dict[str, str], timeout_s: float = 60) -> str:
    """``python -m api ARGS``; its stdout, or PhaseFailed with its stderr."""
    command = f"python -m api {' '.join(args)}"
    try:
        returncode, out, err = await run_process(
            sys.executable, "-m", "api", *args, timeout_s=timeout_s, cwd=ROOT, env=env
        )
    except TimeoutError:
        raise PhaseFailed(f"{command}: timeout") from None
    if returncode != 0:
        raise PhaseFailed(f"{command}: {err.decode()[-300:]}")
    return out.decode()


async def as_admin(statement: str) -> None:
    """One statement on the bench's database, outside the run's schema."""
    connection = await asyncpg.connect(DATABASE_URL, timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


# -- the receiver -----------------------------------------------------------------------


class ProbeReceiver(ReceiverProcess):
    """Records the deliveries whose ``webhook-id`` starts with ``probe-``, with their path
    and arrival time (GET /arrivals?since=K); the others it only answers."""

    def __init__(self) -> None:
        super().__init__("bench.registry")

    async def arrivals(self, session: aiohttp.ClientSession, since: int) -> list[dict[str, Any]]:
        async with session.get(f"{self.base}/arrivals", params={"since": str(since)}) as response:
            response.raise_for_status()
            result: list[dict[str, Any]] = await response.json()
            return result


async def serve_probes(port: int) -> None:
    arrivals: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        event_id = request.headers.get("webhook-id", "")
        if event_id.startswith("probe-"):
            arrivals.append({"id": event_id, "path": request.path, "at": time.time()})
        return web.Response(status=204)

    async def listing(request: web.Request) -> web.Response:
        return web.json_response(arrivals[int(request.query.get("since", "0")) :])

    await serve_receiver(port, hook, [web.get("/arrivals", listing)])


# -- the API client ---------------------------------------------------------------------


class ApiClient:
    def __init__(self, session: aiohttp.ClientSession, base: str, key: str) -> None:
        self.session = session
        self.base = base
        self.headers = {"Authorization": f"Bearer {key}"}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
        """(status, parsed body, milliseconds from sending until the body was read)."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {**self.headers, "Content-Type": "application/json"} if data else self.headers
        started = time.perf_counter()
        async with self.session.request(
            method,
            self.base + path,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=60),
        ) as response:
            raw = await response.read()
        elapsed_ms = (time.perf_counter() - started) * 1000
        with contextlib.suppress(ValueError):
            return response.status, json.loads(raw), elapsed_ms
        return response.status, raw, elapsed_ms


def endpoint_body(index: int, receiver: ProbeReceiver) -> dict[str, Any]:
    return {"name": f"e{index}", "url": receiver.url(index), "events": [f"reg.e{index}"]}


def cursor_for(name: str) -> str:
    """The API's cursor for "after ``name``" (base64url without padding, as api/app.py)."""
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


# -- the run ----------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        tag = f"{os.getpid()}_{secrets.token_hex(3)}"
        self.figures = Figures(
            endpoints=args.endpoints,
            changes=args.changes,
            queue_type=args.queue_type,
            concurrency=args.concurrency,
            exchange=f"hl-reg-{tag.replace('_', '-')}",
            schema=f"hl_bench_{tag}",
        )
        self.database_url = f"{DATABASE_URL}?search_path={self.figures.schema}"
        self.env = child_environment(generate_key())
        self.receiver = ProbeReceiver()
        self.api: Service | None = None
        self.workers: list[Service] = []
        self.created: list[int] = []  # endpoint indexes the API answered 201 for
        self.rng = random.Random(20_261_128)  # which endpoints change: repeatable

    # -- configuration --

    def document(self, **sections: Any) -> dict[str, Any]:
        return worker_document(
            self.figures.exchange,
            self.args.queue_type,
            registry={"database_url": self.database_url},
            endpoints=[],
            **sections,
        )

    def cleanup_document(self) -> dict[str, Any]:
        """What the workers declare, with every endpoint created (for clean-up without
        rabbitmqctl)."""
        document = self.document()
        document["endpoints"] = [
            {**endpoint_body(index, self.receiver), "secret": "whsec_" + "A" * 32}
            for index in self.created
        ]
        return document

    # -- set-up and tear-down --

    async def setup(self, session: aiohttp.ClientSession) -> ApiClient:
        await as_admin(f'CREATE SCHEMA "{self.figures.schema}"')
        api_port = free_port()
        api_config = write_config(
            self.workdir / "api.json", self.document(api={"host": "127.0.0.1", "port": api_port})
        )
        await run_cli(["--config", str(api_config), "migrate"], self.env)
        key = await run_cli(["--config", str(api_config), "create-key", "--admin"], self.env)
        key = key.strip().splitlines()[0]
        await self.receiver.start(session)
        self.api = Service(
            [sys.executable, "-m", "api", "--config", str(api_config)],
            f"http://127.0.0.1:{api_port}",
            self.workdir / "api.log",
            self.env,
        )
        self.api.start()
        await asyncio.wait_for(self.api.wait_ready(session), 60)
        for k in range(WORKERS):
            metrics_port = free_port()
            config = write_config(
                self.workdir / f"worker-{k}.json",
                self.document(metrics={"host": "127.0.0.1", "port": metrics_port}),
            )
            worker = Service.worker(
                config, metrics_port, self.workdir / f"worker-{k}.log", self.env
            )
            worker.start()
            self.workers.append(worker)
        for worker in self.workers:
            await asyncio.wait_for(worker.wait_ready(session, 0), 60)
        return ApiClient(session, self.api.base, key)

    async def teardown(self) -> None:
        for service in reversed(self.services()):  # workers first: they stop consuming
            with contextlib.suppress(Exception):
                await service.stop()
        self.receiver.stop()
        self.figures.cleanup_left_behind = await phase(
            self.figures,
            "cleanup",
            delete_all(self.figures.exchange, self.cleanup_document()),
            self.args.timeout_s,
        )
        try:
            await as_admin(f'DROP SCHEMA IF EXISTS "{self.figures.schema}" CASCADE')
        except Exception as exc:  # noqa: BLE001 - reported, the rest of the clean-up goes on
            self.figures.failures["drop schema"] = failure(exc)

    def meter(self) -> CpuMeter:
        # Labelled as their logs: api, worker-0, worker-1.
        groups = {s.log.stem: [s.pid] for s in self.services() if not s.exited()}
        if self.receiver.pid is not None:
            groups["receiver"] = [self.receiver.pid]
        return CpuMeter(groups)

    async def measured(self, name: str, work: Awaitable[T], timeout_s: float) -> T | None:
        """A phase with its wall time and every process's CPU recorded, and whatever
        disturbed it (the broker or the database away, RabbitMQ restarted)."""
        meter = self.meter()
        meter.start()
        beam = broker_pid()
        offsets = {service.log: service.log_size() for service in self.services()}
        started = time.monotonic()
        try:
            return await phase(self.figures, name, work, timeout_s)
        finally:
            self.figures.phase_s[name] = round(time.monotonic() - started, 2)
            self.figures.cpu_s[name] = meter.stop()
            if broker_pid() != beam:
                self.figures.disturbances.append(f"{name}: RabbitMQ's process changed")
            for log, offset in offsets.items():
                for event, count in disturbances(log, offset).items():
                    self.figures.disturbances.append(f"{name}: {log.stem} {event} x{count}")

    def services(self) -> list[Service]:
        return [*([self.api] if self.api is not None else []), *self.workers]

    # -- 1. registration --

    async def register(self, api: ApiClient, session: aiohttp.ClientSession) -> None:
        fig = self.figures
        count = fig.endpoints
        pending = iter(range(count))
        latencies: list[float] = []
        retries: Counter[str] = Counter()
        first = time.time()
        stop_sampling = asyncio.Event()
        samplers = [
            asyncio.create_task(sample_peak(worker.pid, stop_sampling, 0.1))
            for worker in self.workers
        ]

        async def creator() -> None:
            for index in pending:
                # A 503 (the broker or the database away: on a shared machine, something
                # else may restart them) is retried for a while; it shows in the retries
                # and in the disturbances, and the figures are then not comparable.
                give_up = time.monotonic() + RETRY_503_FOR_S
                attempt = 0
                while True:
                    status, body, elapsed_ms = await api.call(
                        "POST", "/v1/endpoints", endpoint_body(index, self.receiver)
                    )
                    taken = status == 409 and attempt > 0 and _code(body) == "name_taken"
                    if status == 201 or taken:
                        latencies.append(elapsed_ms)
                        self.created.append(index)
                        break
                    retries[f"{status} {_code(body)}"] += 1
                    if status != 503 or time.monotonic() > give_up:
                        raise PhaseFailed(f"creating e{index}: {status} {str(body)[:200]}")
                    attempt += 1
                    await asyncio.sleep(min(0.2 * attempt, 2.0))
                if len(self.created) % 1000 == 0:
                    rate = len(self.created) / (time.time() - first)
                    print(f"  {len(self.created):,} created ({rate:.0f}/s)", flush=True)

        try:
            await asyncio.gather(*(creator() for _ in range(self.args.concurrency)))
            last = time.time()
            fig.registered = len(self.created)
            fig.register_s = round(last - first, 2)
            fig.register_per_s = round(fig.registered / (last - first), 1)
            fig.register_create_p50_ms, fig.register_create_p99_ms = p50_p99(latencies)
            fig.register_retries = dict(retries)
            print(
                f"  {fig.registered:,} created in {fig.register_s:.1f} s "
                f"({fig.register_per_s:,.0f}/s; p50 {fig.register_create_p50_ms} ms, "
                f"p99 {fig.register_create_p99_ms} ms at {self.args.concurrency} at a time)",
                flush=True,
            )
            ready_at, pass_s = await self.wait_consumed(session, count)
            fig.ready_after_first_create_s = round(ready_at - first, 2)
            fig.ready_after_last_create_s = round(ready_at - last, 2)
            fig.ready_check_pass_s = round(pass_s, 2)
            fig.queues_with_both_consumers = count
            print(
                f"  every endpoint consumed by both workers {fig.ready_after_first_create_s:.1f} s"
                f" after the first create ({fig.ready_after_last_create_s:.1f} s after the last)",
                flush=True,
            )
        finally:
            stop_sampling.set()
            fig.worker_rss_peak_registering_mb = [
                round(peak, 1) for peak in await asyncio.gather(*samplers)
            ]
        await asyncio.sleep(2)  # what the workers hold once settled
        fig.worker_rss_ready_mb = [round(rss_mb(w.pid) or 0.0, 1) for w in self.workers]
        assert self.api is not None
        fig.api_rss_mb = round(rss_mb(self.api.pid) or 0.0, 1)

    async def wait_consumed(
        self, session: aiohttp.ClientSession, count: int
    ) -> tuple[float, float]:
        """When every endpoint queue has both workers' consumers and both workers answer
        /readyz 200 with ``count`` registry endpoints: (that moment, one full check's s)."""
        pending = [endpoint_queue(self.figures.exchange, f"e{i}") for i in self.created]
        full_pass_s = 0.0
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            while True:
                started = time.monotonic()
                pending = await short_of_consumers(connection, pending, WORKERS)
                if not full_pass_s:
                    full_pass_s = time.monotonic() - started
                if not pending:
                    answers = await asyncio.gather(*(w.readyz(session) for w in self.workers))
                    if all(
                        status == 200 and registry_count(body) == count for status, body in answers
                    ):
                        return time.time(), full_pass_s
                for worker in self.workers:
                    if worker.exited():
                        raise PhaseFailed(f"a worker exited; see {worker.log}: {worker.tail()}")
                await asyncio.sleep(0.1)

    # -- 2. API latency --

    async def latency(self, api: ApiClient) -> None:
        fig = self.figures
        assert self.api is not None
        names = sorted(f"e{i}" for i in self.created)  # as the API orders them
        samples: dict[str, list[float]] = {"get": [], "list": [], "create": []}
        errors: Counter[str] = Counter()
        cpu: dict[str, float] = {}

        async def timed(kind: str, method: str, path: str, body: Any, expect: int) -> bool:
            """One request; a 503 is counted (and fails the phase at its end, with the
            figures of the rest kept), anything else unexpected fails it at once."""
            status, answer, elapsed_ms = await api.call(method, path, body)
            if status == 503:
                errors[f"{kind} {status} {_code(answer)}"] += 1
                return False
            if status != expect:
                raise PhaseFailed(f"{method} {path}: {status} {str(answer)[:200]}")
            if kind == "list" and len(answer["data"]) == 0:
                raise PhaseFailed(f"{method} {path}: an empty page")
            samples[kind].append(elapsed_ms)
            return True

        gets, lists, creates = (
            (GET_SAMPLES, LIST_SAMPLES, CREATE_SAMPLES)
            if self.args.requests is None
            else (self.args.requests,) * 3
        )
        before = cpu_seconds(self.api.pid) or 0.0
        for _ in range(gets):
            await timed("get", "GET", f"/v1/endpoints/{self.rng.choice(names)}", None, 200)
        after = cpu_seconds(self.api.pid) or 0.0
        cpu["get"], before = (after - before) * 1000 / gets, after
        for _ in range(lists):
            cursor = cursor_for(self.rng.choice(names[: max(1, len(names) - 100)]))  # full pages
            path = f"/v1/endpoints?limit=100&cursor={cursor}"
            await timed("list", "GET", path, None, 200)
        after = cpu_seconds(self.api.pid) or 0.0
        cpu["list"], before = (after - before) * 1000 / lists, after
        for k in range(creates):
            index = fig.endpoints + k
            if await timed(
                "create", "POST", "/v1/endpoints", endpoint_body(index, self.receiver), 201
            ):
                self.created.append(index)
        after = cpu_seconds(self.api.pid) or 0.0
        cpu["create"] = (after - before) * 1000 / creates
        fig.api_cpu_ms_per_request = {kind: round(ms, 2) for kind, ms in cpu.items()}
        fig.get_p50_ms, fig.get_p99_ms = p50_p99(samples["get"])
        fig.list_p50_ms, fig.list_p99_ms = p50_p99(samples["list"])
        fig.create_p50_ms, fig.create_p99_ms = p50_p99(samples["create"])
        fig.latency_errors = dict(errors)
        print(
            f"  get p50/p99 {fig.get_p50_ms}/{fig.get_p99_ms} ms, list {fig.list_p50_ms}/"
            f"{fig.list_p99_ms} ms, create {fig.create_p50_ms}/{fig.create_p99_ms} ms",
            flush=True,
        )
        if errors:
            raise PhaseFailed(
                "answered 503: " + ", ".join(f"{what} x{n}" for what, n in errors.items())
            )

    # -- 3. change propagation --

    async def propagation(self, api: ApiClient, session: aiohttp.ClientSession) -> None:
        fig = self.figures
        base = [i for i in self.created if i < fig.endpoints]
        chosen = self.rng.sample(base, min(fig.changes, len(base)))
        targets = [chosen[k % len(chosen)] for k in range(fig.changes)]
        urls = {index: self.receiver.url(index) for index in set(targets)}
        samples: list[dict[str, Any]] = []
        seen = len(await self.receiver.arrivals(session, 0))
        async with Publisher(AMQP_URL, fig.exchange, max_in_flight=16) as publisher:
            for k, index in enumerate(targets):
                sample, seen = await self.change_one(k, index, urls, api, session, publisher, seen)
                samples.append(sample)
                await asyncio.sleep(0.05)
        fig.propagation = samples
        applied = [s["both_applied_s"] for s in samples]
        fig.propagation_p50_s, fig.propagation_p99_s = p50_p99(applied)
        fig.propagation_max_s = round(max(applied), 3)
        fig.first_worker_p50_s, fig.first_worker_p99_s = p50_p99(
            [s["first_applied_s"] for s in samples]
        )
        first_new = [s["first_at_new_url_s"] for s in samples]
        fig.first_at_new_url_p50_s, fig.first_at_new_url_p99_s = p50_p99(first_new)
        fig.first_at_new_url_max_s = round(max(first_new), 3)
        fig.patch_p50_ms, fig.patch_p99_ms = p50_p99([s["patch_ms"] for s in samples])
        fig.probes_published = sum(s["probes"] for s in samples)
        fig.probes_to_old_url_after_answer = sum(s["old_url_after_answer"] for s in samples)
        fig.stale_after_applied = sum(s["stale_after_applied"] for s in samples)
        print(
            f"  {len(samples)} changes: both workers applied p50/p99/max {fig.propagation_p50_s}/"
            f"{fig.propagation_p99_s}/{fig.propagation_max_s} s after the answer; first probe "
            f"at the new URL p50/p99 {fig.first_at_new_url_p50_s}/{fig.first_at_new_url_p99_s}"
            f" s; {fig.stale_after_applied} stale",
            flush=True,
        )
        if fig.stale_after_applied:
            raise PhaseFailed(
                f"{fig.stale_after_applied} probes published after both workers applied the "
                "change reached the old URL"
            )

    async def change_one(
        self,
        k: int,
        index: int,
        urls: dict[int, str],
        api: ApiClient,
        session: aiohttp.ClientSession,
        publisher: Publisher,
        seen: int,
    ) -> tuple[dict[str, Any], int]:
        """One URL change: PATCH, then probes every 20 ms until both workers applied it and
        a probe reached the new URL. Returns the sample and the receiver's arrival count."""
        name = f"e{index}"
        old_url, new_url = urls[index], self.receiver.url(index, f"/v{k}")
        old_path, new_path = urlsplit(old_url).path, urlsplit(new_url).path
        followers = [
            LogFollower(worker.log, worker.log_size(), "config_reloaded") for worker in self.workers
        ]
        status, body, patch_ms = await api.call("PATCH", f"/v1/endpoints/{name}", {"url": new_url})
        answered = time.time()
        if status != 200:
            raise PhaseFailed(f"PATCH {name}: {status} {str(body)[:200]}")
        urls[index] = new_url
        published: dict[str, float] = {}
        arrivals: list[dict[str, Any]] = []
        applied: list[float | None] = [None] * len(self.workers)
        stop = asyncio.Event()

        async def probe() -> None:
            j = 0
            while not stop.is_set():
                event_id = f"probe-{k}-{j}"
                published[event_id] = time.time()
                await publisher.publish(f"reg.{name}", {"change": k}, event_id=event_id)
                j += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), PROBE_INTERVAL_S)

        prober = asyncio.create_task(probe())
        deadline = time.monotonic() + CHANGE_TIMEOUT_S
        try:
            while True:
                for w, follower in enumerate(followers):
                    for line in follower.lines():
                        if applied[w] is None and name in (line.get("changed") or []):
                            applied[w] = logged_at(line)
                fresh = await self.receiver.arrivals(session, seen)
                seen += len(fresh)
                arrivals += fresh
                at_new = [a for a in arrivals if a["path"] == new_path]
                if all(at is not None for at in applied) and at_new:
                    break
                if prober.done():
                    prober.result()  # a failed publish ends the phase
                if time.monotonic() > deadline:
                    raise PhaseFailed(
                        f"change {k} ({name}): applied by {applied}, "
                        f"{len(at_new)} probes at the new URL after {CHANGE_TIMEOUT_S:g} s"
                    )
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.gather(prober, return_exceptions=True)
        # Probes still on their way land within a few milliseconds.
        for _ in range(50):
            if len({a["id"] for a in arrivals if a["id"] in published}) >= len(published):
                break
            await asyncio.sleep(0.02)
            fresh = await self.receiver.arrivals(session, seen)
            seen += len(fresh)
            arrivals += fresh
        both = max(at for at in applied if at is not None)
        mine = [a for a in arrivals if a["id"] in published]
        sample = {
            "endpoint": name,
            "patch_ms": round(patch_ms, 2),
            "applied_s": [round(at - answered, 4) for at in applied if at is not None],
            "both_applied_s": round(both - answered, 4),
            "first_applied_s": round(min(at for at in applied if at is not None) - answered, 4),
            "first_at_new_url_s": round(
                min(a["at"] for a in mine if a["path"] == new_path) - answered, 4
            ),
            "probes": len(published),
            "probes_arrived": len({a["id"] for a in mine}),
            "old_url_after_answer": sum(
                1 for a in mine if a["path"] == old_path and published[a["id"]] >= answered
            ),
            "stale_after_applied": sum(
                1 for a in mine if a["path"] == old_path and published[a["id"]] > both
            ),
        }
        return sample, seen

    # -- 4. cold start --

    async def registered(self) -> int:
        """How many endpoints the registry holds (whatever the API answered)."""
        connection = await asyncpg.connect(self.database_url, timeout=10)
        try:
            return int(await connection.fetchval("SELECT count(*) FROM endpoints"))
        finally:
            await connection.close()

    async def cold_start(self, session: aiohttp.ClientSession) -> None:
        worker = self.workers[-1]
        await worker.stop()
        worker.start()
        fig = self.figures
        expected = await self.registered()
        fig.cold_start_s = round(await worker.wait_ready(session, expected), 2)
        await asyncio.sleep(2)
        fig.cold_start_rss_mb = round(rss_mb(worker.pid) or 0.0, 1)
        print(
            f"  a worker restarted with {expected:,} endpoints in the registry: ready "
            f"in {fig.cold_start_s:.1f} s, RSS {fig.cold_start_rss_mb:.0f} MB",
            flush=True,
        )

    async def registry_metric(self, session: aiohttp.ClientSession) -> None:
        values: list[float | None] = []
        for worker in self.workers:
            async with session.get(
                f"{worker.base}/metrics", timeout=aiohttp.ClientTimeout(total=60)
            ) as response:
                text = await response.text()
            found = [
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("webhook_registry_endpoints ")
            ]
            values.append(found[0] if found else None)
        self.figures.registry_endpoints_metric = values

    async def run(self) -> Figures:
        fig = self.figures
        timeout_s = self.args.timeout_s
        connector = aiohttp.TCPConnector(limit=self.args.concurrency + 8)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                print(
                    f"registry: {fig.endpoints:,} endpoints, {fig.changes} changes, "
                    f"{fig.queue_type} queues; exchange {fig.exchange}, schema {fig.schema}, "
                    f"logs {self.workdir}",
                    flush=True,
                )
                api = await phase(fig, "set-up", self.setup(session), 120)
                if api is None:
                    return fig
                await self.measured("register", self.register(api, session), 2 * timeout_s)
                if "register" in fig.failures:
                    return fig
                await self.measured("latency", self.latency(api), timeout_s)
                await self.measured("propagation", self.propagation(api, session), timeout_s)
                await self.measured("cold start", self.cold_start(session), timeout_s)
                await phase(fig, "metrics", self.registry_metric(session), 120)
            finally:
                await self.teardown()
        return fig


def _code(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code", ""))
    return ""


async def short_of_consumers(
    connection: aio_pika.abc.AbstractConnection, queues: list[str], wanted: int
) -> list[str]:
    """The queues with fewer than ``wanted`` consumers (passive declarations on a few
    channels; a queue that does not exist counts as short)."""
    work = list(queues)
    short: list[str] = []

    async def checker() -> None:
        channel = await connection.channel()
        try:
            while work:
                name = work.pop()
                try:
                    queue = await channel.declare_queue(name, passive=True)
                except aio_pika.exceptions.ChannelClosed:
                    short.append(name)
                    channel = await connection.channel()
                    continue
                result = queue.declaration_result
                if (result.consumer_count or 0) < wanted:
                    short.append(name)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    await asyncio.gather(*(checker() for _ in range(CHECK_CHANNELS)))
    return short


# -- the table --------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "failed" if value is None else f"{value:.1f}"


def _s(value: float | None, digits: int = 2) -> str:
    return "failed" if value is None else f"{value:.{digits}f}"


def table(fig: Figures) -> str:
    """The figures as a Markdown table, with the targets (which apply at 10,000)."""
    at_scale = fig.endpoints >= TARGET_AT

    def verdict(name: str) -> str:
        value = getattr(fig, name)
        if value is None:
            return "failed"
        met = value <= TARGETS[name][0]
        return ("met" if met else "MISSED") if at_scale else ("(met)" if met else "(over)")

    def mb(values: list[float]) -> str:
        return " / ".join(f"{value:.0f}" for value in values) if values else "failed"

    rows: list[tuple[str, str, str, str]] = [
        ("registration: creates per second", _s(fig.register_per_s, 0), "", ""),
        (
            f"registration: create p50 / p99 ms ({fig.concurrency} at a time)",
            f"{_ms(fig.register_create_p50_ms)} / {_ms(fig.register_create_p99_ms)}",
            "",
            "",
        ),
        ("ready: first create -> all consumed, s", _s(fig.ready_after_first_create_s, 1), "", ""),
        ("ready: last create -> all consumed, s", _s(fig.ready_after_last_create_s, 1), "", ""),
        ("worker RSS peak while registering, MB", mb(fig.worker_rss_peak_registering_mb), "", ""),
        ("worker RSS ready, MB", mb(fig.worker_rss_ready_mb), "", ""),
    ]
    for kind in ("create", "get", "list"):
        p50, p99 = getattr(fig, f"{kind}_p50_ms"), getattr(fig, f"{kind}_p99_ms")
        label = f"API {kind}{' (limit 100)' if kind == 'list' else ''} p50 / p99 ms"
        name = f"{kind}_p99_ms"
        rows.append((label, f"{_ms(p50)} / {_ms(p99)}", f"p99 {TARGETS[name][1]}", verdict(name)))
    rows += [
        (
            "propagation (both workers applied) p50 / p99 / max s",
            f"{_s(fig.propagation_p50_s, 3)} / {_s(fig.propagation_p99_s, 3)} / "
            f"{_s(fig.propagation_max_s, 3)}",
            f"p99 {TARGETS['propagation_p99_s'][1]}",
            verdict("propagation_p99_s"),
        ),
        (
            "first probe at the new URL p50 / p99 / max s",
            f"{_s(fig.first_at_new_url_p50_s, 3)} / {_s(fig.first_at_new_url_p99_s, 3)} / "
            f"{_s(fig.first_at_new_url_max_s, 3)}",
            "",
            "",
        ),
        (
            "probes at the old URL published after both applied",
            "failed" if fig.stale_after_applied is None else str(fig.stale_after_applied),
            "0",
            ""
            if fig.stale_after_applied is None
            else ("met" if not fig.stale_after_applied else "MISSED"),
        ),
        ("worker cold start with every endpoint, s", _s(fig.cold_start_s, 1), "", ""),
        ("worker RSS after cold start, MB", _s(fig.cold_start_rss_mb, 0), "", ""),
    ]
    heading = f"| scenario (j) registry, {fig.endpoints:,} endpoints, {fig.queue_type} |"
    lines = [
        heading + " value | target | verdict |",
        "|---|---|---|---|",
        *(f"| {label} | {value} | {target} | {met} |" for label, value, target, met in rows),
    ]
    return "\n".join(lines)


def cpu_table(fig: Figures) -> str:
    labels = sorted({label for used in fig.cpu_s.values() for label in used})
    lines = [
        "| phase | wall s | " + " | ".join(f"{label} CPU s" for label in labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for name, used in fig.cpu_s.items():
        cells = [f"{used[label]:.1f}" if label in used else "" for label in labels]
        lines.append(f"| {name} | {fig.phase_s.get(name, 0):.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------


def positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError("must be between 1 and 10,000")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.registry",
        description='Scenario (j) "registry": the API and two workers following the '
        "registry (loopback, local PostgreSQL and RabbitMQ).",
    )
    parser.add_argument("--endpoints", type=endpoint_count, default=10_000, metavar="N")
    parser.add_argument("--changes", type=positive, default=100, help="URL changes to time")
    parser.add_argument(
        "--concurrency", type=positive, default=32, help="creates in flight while registering"
    )
    parser.add_argument(
        "--requests",
        type=positive,
        metavar="K",
        help=f"requests timed per kind (default: {GET_SAMPLES} gets, {LIST_SAMPLES} lists, "
        f"{CREATE_SAMPLES} creates)",
    )
    parser.add_argument("--queue-type", choices=["classic", "quorum"], default="classic")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--timeout-s", type=float, default=900.0, help="per-phase timeout (registration 2x)"
    )
    parser.add_argument("--keep-logs", metavar="DIR", help="keep configs and logs in DIR")
    parser.add_argument("--serve-receiver", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve_receiver is not None:
        asyncio.run(serve_probes(args.serve_receiver))
        return 0
    command = shlex.join(
        ["python", "-m", "bench.registry", *(sys.argv[1:] if argv is None else argv)]
    )
    workdir = make_workdir(args.keep_logs, "hookline-registry-")
    started = time.time()
    load_before = [round(v, 2) for v in os.getloadavg()]
    figures = asyncio.run(Run(args, workdir).run())
    print()
    print(table(figures))
    print()
    print(cpu_table(figures))
    for name, reason in figures.failures.items():
        print(f"{name} failed: {reason}")
    for disturbance in figures.disturbances:
        print(f"disturbed: {disturbance}")
    if args.endpoints >= TARGET_AT and (missed := figures.missed()):
        print(f"targets missed: {', '.join(missed)}")
    if args.json:
        write_results(
            args.json,
            {
                "scenario": "registry",
                "command": command,
                "started_at": datetime.fromtimestamp(started).astimezone().isoformat(),
                "duration_s": round(time.time() - started, 1),
                "environment": {
                    **environment(args.queue_type),
                    "workers": WORKERS,
                    "samples": {
                        kind: args.requests or default
                        for kind, default in (
                            ("get", GET_SAMPLES),
                            ("list", LIST_SAMPLES),
                            ("create", CREATE_SAMPLES),
                        )
                    },
                    # Other work on the machine shows here: the figures are not
                    # isolated from it.
                    "load_average_before": load_before,
                    "load_average_after": [round(v, 2) for v in os.getloadavg()],
                },
                "targets_at": TARGET_AT,
                "targets": {name: limit for name, (limit, _) in TARGETS.items()},
                "missed": figures.missed() if args.endpoints >= TARGET_AT else [],
                "figures": asdict(figures),
            },
        )
    if args.keep_logs or figures.failures:
        print(f"configs and logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if figures.failures else 0


if __name__ == "__main__":
    sys.exit(main())
