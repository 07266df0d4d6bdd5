"""Shared fixtures: real RabbitMQ, real aiohttp receivers on loopback, real workers.

Every test gets its own exchange name, and with it its own queues; all are deleted
afterwards, so tests run in any order and twice in a row.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiohttp import web

from producer.exchange import declare_exchange
from worker.metrics import Metrics
from worker.service import Worker
from worker.settings import Settings, settings_from_document
from worker.topology import exchange_names, queue_names

AMQP_URL = os.environ.get("HOOKLINE_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
SECRET_A = "whsec_" + base64.b64encode(b"a" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b" * 32).decode()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 whose answers each test scripts per path."""

    base_url: str = ""
    requests: list[Received] = field(default_factory=list)
    # path -> list of (status, headers, delay_s); the last entry repeats.
    scripts: dict[str, list[tuple[int, dict[str, str], float]]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def script(
        self,
        path: str,
        *answers: int | tuple[int, dict[str, str]] | tuple[int, dict[str, str], float],
    ) -> None:
        steps: list[tuple[int, dict[str, str], float]] = []
        for answer in answers:
            if isinstance(answer, int):
                steps.append((answer, {}, 0.0))
            elif len(answer) == 2:
                steps.append((answer[0], answer[1], 0.0))
            else:
                steps.append(answer)  # type: ignore[arg-type]
        self.scripts[path] = steps

    def on(self, path: str) -> list[Received]:
        return [request for request in self.requests if request.path == path]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; received {len(self.requests)} requests")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), timeout=min(remaining, 0.2))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        index = len(self.on(path))
        self.requests.append(Received(path, dict(request.headers), body, time.monotonic()))
        self.arrived.set()
        steps = self.scripts.get(path, [(200, {}, 0.0)])
        status, headers, delay_s = steps[min(index, len(steps) - 1)]
        if delay_s:
            await asyncio.sleep(delay_s)
        return web.Response(status=status, headers=headers, text="answer from the test receiver")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base_url = f"http://{host}:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
def exchange_name() -> str:
    return f"hl-test-{uuid.uuid4().hex[:12]}"


def make_document(
    exchange: str, endpoints: list[dict[str, Any]], **sections: Any
) -> dict[str, Any]:
    """A config document for tests: loopback allowed, short delays, classic or quorum queues."""
    document: dict[str, Any] = {
        "broker": {"url": AMQP_URL, "exchange": exchange, "publish_timeout_s": 5},
        "worker": {"shutdown_timeout_s": 5},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "retry": {"delays_s": [0.2, 0.4]},
        "security": {"require_https": False, "allow_private_networks": True},
        "endpoints": endpoints,
    }
    for name, values in sections.items():
        document[name] = {**document.get(name, {}), **values}
    return document


def make_settings(exchange: str, endpoints: list[dict[str, Any]], **sections: Any) -> Settings:
    return settings_from_document(
        make_document(exchange, endpoints, **sections), Path("test.yaml"), {}
    )


def endpoint(name: str, url: str, events: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "events": events, "secret": SECRET_A, **extra}


class Broker:
    """Direct broker access for tests: publish as a service would, read queues, clean up."""

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        self.connection = connection
        self.declared: set[tuple[str, str]] = set()

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, **properties: Any
    ) -> None:
        channel = await self.connection.channel(on_return_raises=True)
        try:
            target = await declare_exchange(channel, exchange)
            properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
            await target.publish(aio_pika.Message(body, **properties), routing_key, timeout=5)
        finally:
            await channel.close()

    async def drain(self, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take (and ack) every message now in ``queue_name``."""
        channel = await self.connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            messages = []
            while (message := await queue.get(fail=False, no_ack=True)) is not None:
                messages.append(message)
            return messages
        finally:
            await channel.close()

    async def depth(self, queue_name: str) -> int:
        channel = await self.connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            return int(queue.declaration_result.message_count or 0)
        finally:
            await channel.close()

    async def delete_all(self, settings: Settings) -> None:
        channel = await self.connection.channel()
        try:
            for name in queue_names(settings):
                await channel.queue_delete(name, if_unused=False, if_empty=False)
            for name in exchange_names(settings.broker.exchange):
                await channel.exchange_delete(name)
        finally:
            await channel.close()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        yield Broker(connection)
    finally:
        await connection.close()


class RunWorker:
    """Starts real workers in the test's event loop: ``worker = await run_worker(settings)``."""

    def __init__(self) -> None:
        self.tasks: dict[Worker, asyncio.Task[None]] = {}

    async def __call__(self, settings: Settings) -> Worker:
        worker = Worker(settings, Metrics())
        task = asyncio.create_task(worker.run())
        self.tasks[worker] = task
        deadline = time.monotonic() + 20
        while not worker.is_ready():
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise AssertionError("worker did not become ready")
            await asyncio.sleep(0.02)
        return worker

    async def stop(self, worker: Worker, timeout_s: float = 30) -> None:
        """Request a stop as SIGTERM would, and wait until the worker has finished."""
        worker.request_stop()
        await asyncio.wait_for(self.tasks[worker], timeout=timeout_s)


@pytest.fixture
async def run_worker(broker: Broker) -> AsyncIterator[RunWorker]:
    """Workers started through this are stopped, and their queues deleted, afterwards."""
    workers = RunWorker()
    try:
        yield workers
    finally:
        for worker in workers.tasks:
            worker.request_stop()
        for task in workers.tasks.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=30)
        for worker in workers.tasks:
            with contextlib.suppress(Exception):
                await broker.delete_all(worker.settings)


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


REPO = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """``python -m worker run`` as a real child process; killed on exit if still running."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.log_lines: list[str] = []

    async def __aenter__(self) -> WorkerProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "run", "--config", str(self.config), cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def wait_for_log(self, event: str, timeout_s: float = 20) -> dict[str, Any]:
        """Read the log until ``event`` appears; returns that record."""
        assert self.process is not None and self.process.stderr is not None
        stderr = self.process.stderr

        async def read() -> dict[str, Any]:
            while line := (await stderr.readline()).decode():
                self.log_lines.append(line)
                if line.startswith("{") and json.loads(line).get("event") == event:
                    return dict(json.loads(line))
            raise AssertionError(f"worker ended before logging {event}")

        return await asyncio.wait_for(read(), timeout=timeout_s)

    async def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Send ``signum``, read the rest of the log, and return the exit code."""
        assert self.process is not None and self.process.stderr is not None
        self.process.send_signal(signum)
        rest = await asyncio.wait_for(self.process.stderr.read(), timeout=timeout_s)
        self.log_lines.extend(rest.decode().splitlines(keepends=True))
        return await self.process.wait()

    def events(self) -> list[str]:
        return [json.loads(line)["event"] for line in self.log_lines if line.startswith("{")]
