"""What the subprocess scenarios share: (h) ``bench.scale`` and (j) ``bench.registry``.

Both run Hookline's processes as subprocesses against the local RabbitMQ, on loopback: a
phase is bounded by a timeout and reported rather than raised, processes are measured from
/proc, and every queue and exchange of the run's exchange is deleted afterwards.
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import aio_pika
import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from bench.receivers import free_port

AMQP_URL = os.environ.get("HOOKLINE_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parent.parent
MAX_ENDPOINTS = 20_000
CLEANUP_CHANNELS = 8
T = TypeVar("T")


# -- phases -----------------------------------------------------------------------------


class PhaseFailed(Exception):
    pass


class Reported(Protocol):
    """A scenario's figures: a failed phase is recorded in ``failures``."""

    failures: dict[str, str]


def failure(exc: BaseException) -> str:
    """How a failed phase is reported: the exception, briefly."""
    return f"{exc.__class__.__name__}: {exc}"[:300]


async def phase(figures: Reported, name: str, work: Awaitable[T], timeout_s: float) -> T | None:
    """Run one phase within ``timeout_s``; on failure record why and return None."""
    try:
        return await asyncio.wait_for(work, timeout_s)
    except TimeoutError:
        figures.failures[name] = f"timeout after {timeout_s:g} s"
    except Exception as exc:  # noqa: BLE001 - a failed phase is reported, never raised
        figures.failures[name] = failure(exc)
    print(f"  {name}: FAILED ({figures.failures[name]})", flush=True)
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


async def sample_peak(pid: int, stop: asyncio.Event, interval_s: float = 0.05) -> float:
    """The highest RSS of a process until ``stop`` is set, sampled every ``interval_s``."""
    peak = 0.0
    while not stop.is_set():
        peak = max(peak, rss_mb(pid) or 0.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
    return max(peak, rss_mb(pid) or 0.0)


def pgrep(user: str, *pattern: str) -> list[int]:
    """Pids of ``user``'s processes (whose command line matches ``pattern``, if given)."""
    found = shutil.which("pgrep")
    if found is None:
        return []
    argv = [found, "-u", user, *(["-f", *pattern] if pattern else [])]
    listed = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    return [int(pid) for pid in listed.stdout.split()]


def broker_pid() -> int | None:
    """The local RabbitMQ node's beam.smp (not ``rabbitmqctl status``: minutes with many
    queues)."""
    pids = pgrep("rabbitmq", "beam.smp")
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


async def run_process(*argv: str, timeout_s: float, **kwargs: Any) -> tuple[int, bytes, bytes]:
    """A command run to its end: (exit code, stdout, stderr); TimeoutError (killed) after
    ``timeout_s``."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, out, err


async def rabbitmqctl_names(kind: str, exchange: str, timeout_s: float = 300) -> list[str] | None:
    """Names of the run's queues or exchanges (``kind``) by rabbitmqctl; None if it cannot."""
    ctl = shutil.which("rabbitmqctl") or shutil.which("rabbitmqctl", path="/usr/sbin:/sbin")
    if ctl is None:
        return None
    argv = [ctl, "-q", "-p", vhost(), f"list_{kind}", "name"]
    try:
        returncode, out, _ = await run_process(*argv, timeout_s=timeout_s)
    except TimeoutError:
        return None
    if returncode != 0:
        return None
    return [name for name in out.decode().splitlines() if owned(name.strip(), exchange)]


def known_names(exchange: str, document: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Without rabbitmqctl: the names the worker declares, by its own naming functions."""
    from worker.settings import settings_from_document
    from worker.topology import exchange_names, queue_names

    settings = settings_from_document(document, Path("bench.json"), {})  # for errors
    return queue_names(settings), exchange_names(exchange)


async def delete_all(exchange: str, document: dict[str, Any]) -> int:
    """Delete every queue and exchange of the run, concurrently on a few channels; return how
    many are left (0, or -1 if they could not be listed afterwards). ``document`` is a worker
    config with every endpoint of the run, for when rabbitmqctl cannot list them."""
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


class ReceiverProcess:
    """The scenario's aiohttp receiver (:func:`serve_receiver`), in a subprocess started as
    ``python -m <module> --serve-receiver PORT`` so that it never shares this event loop."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, index: int, suffix: str = "") -> str:
        return f"{self.base}/e/{index}{suffix}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", self.module, "--serve-receiver", str(self.port)], cwd=ROOT
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(self.base + "/"):  # any answer: it serves
                    return
            await asyncio.sleep(0.05)
        self.stop()
        raise RuntimeError("the receiver did not start")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


async def serve_receiver(port: int, hook: Handler, routes: list[web.RouteDef]) -> None:
    """Until SIGTERM: POST /e/<i>[/...] (a delivery to endpoint i) to ``hook``, and
    ``routes``."""
    # One socket per endpoint's connection pool: thousands at scale.
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app = web.Application()
    app.router.add_post(r"/e/{index:\d+}", hook)
    app.router.add_post(r"/e/{index:\d+}/{tail:.*}", hook)
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


# -- Hookline's processes ---------------------------------------------------------------


def child_environment(secret_key: str | None = None) -> dict[str, str]:
    """This environment without Hookline's overrides (the configs say it all), with the
    run's secret key if it has one."""
    overrides = ("HOOKLINE_BROKER_URL", "HOOKLINE_DATABASE_URL", "HOOKLINE_SECRET_KEY")
    environment = {k: v for k, v in os.environ.items() if k not in overrides}
    if secret_key is not None:
        environment["HOOKLINE_SECRET_KEY"] = secret_key
    return environment


def worker_document(exchange: str, queue_type: str, **sections: Any) -> dict[str, Any]:
    """A worker (or API) config on the run's exchange, JSON-logging, for loopback URLs."""
    return {
        "broker": {"url": AMQP_URL, "exchange": exchange, "queue_type": queue_type},
        "worker": {"shutdown_timeout_s": 10, "log_format": "json", "log_level": "info"},
        "security": {"require_https": False, "allow_private_networks": True},
        **sections,
    }


def write_config(path: Path, document: dict[str, Any]) -> Path:
    """As JSON (the worker reads it in milliseconds where YAML takes about a second at 10,000
    endpoints: README, Configuration), atomically, so that a reload never reads half a
    file."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(document))
    partial.replace(path)
    return path


class Service:
    """A subprocess of the run (a worker or the API), its output appended to ``log``."""

    def __init__(self, argv: list[str], base: str, log: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.name = argv[2]  # "worker" or "api" (python -m NAME): what messages call it
        self.base = base
        self.log = log
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._log_handle: IO[bytes] | None = None

    @classmethod
    def worker(cls, config: Path, metrics_port: int, log: Path, env: dict[str, str]) -> Service:
        argv = [sys.executable, "-m", "worker", "run", "--config", str(config)]
        return cls(argv, f"http://127.0.0.1:{metrics_port}", log, env)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self._log_handle = self.log.open("ab")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=self._log_handle, stderr=subprocess.STDOUT
        )

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def tail(self, lines: int = 3) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])[-600:]
        return ""

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    async def readyz(self, session: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        async with session.get(
            f"{self.base}/readyz", timeout=aiohttp.ClientTimeout(total=5)
        ) as response:
            body = await response.json(content_type=None)
            return response.status, body if isinstance(body, dict) else {}

    async def wait_ready(
        self, session: aiohttp.ClientSession, registry_endpoints: int | None = None
    ) -> float:
        """Seconds from start until /readyz answers 200 (with the registry's endpoint count
        at ``registry_endpoints``, if given)."""
        while True:
            if self.exited():
                raise PhaseFailed(f"{self.name} exited; see {self.log}: {self.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                status, body = await self.readyz(session)
                if status == 200 and registry_endpoints in (None, registry_count(body)):
                    return time.monotonic() - self.started
            await asyncio.sleep(0.05)

    async def stop(self, timeout_s: float = 60) -> float:
        """SIGTERM, then SIGKILL after ``timeout_s``; seconds it took to exit."""
        started = time.monotonic()
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(self.process.wait, timeout_s)
                except subprocess.TimeoutExpired:
                    print(f"  {self.name} did not stop on SIGTERM: killed", flush=True)
                    self.process.kill()
                    await asyncio.to_thread(self.process.wait)
        finally:
            if self._log_handle is not None:
                self._log_handle.close()
                self._log_handle = None
        return time.monotonic() - started


def registry_count(readyz: dict[str, Any]) -> int | None:
    """The registry's endpoint count in a worker's /readyz answer; None without a registry."""
    detail = readyz.get("detail")
    section = detail.get("registry") if isinstance(detail, dict) else None
    return section.get("endpoints") if isinstance(section, dict) else None


class LogFollower:
    """The JSON lines with one of ``events`` that a process writes to ``log`` after
    ``offset``, parsed, a call to :meth:`lines` at a time."""

    def __init__(self, log: Path, offset: int, *events: str) -> None:
        self.log = log
        self.position = offset
        self._pending = b""
        alternatives = b"|".join(re.escape(event.encode()) for event in events)
        self._pattern = re.compile(rb'"event":\s*"(?:' + alternatives + rb')"')

    def lines(self) -> list[dict[str, Any]]:
        with self.log.open("rb") as handle:
            handle.seek(self.position)
            chunk = handle.read()
        self.position += len(chunk)
        *complete, self._pending = (self._pending + chunk).split(b"\n")
        found = []
        for line in complete:
            if self._pattern.search(line):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found


def logged_at(line: dict[str, Any]) -> float:
    """A JSON log line's ``timestamp`` as a Unix time."""
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


# -- the command ------------------------------------------------------------------------


def endpoint_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_ENDPOINTS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_ENDPOINTS:,}")
    return value


def make_workdir(keep_logs: str | None, prefix: str) -> Path:
    """``--keep-logs DIR``, or a fresh temporary directory (removed when all went well)."""
    workdir = Path(keep_logs or tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def environment(queue_type: str) -> dict[str, Any]:
    """The JSON results' ``environment``, as far as the scenarios share it."""
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "queue_type": queue_type}


def write_results(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    print(f"\nresults: {path}")
