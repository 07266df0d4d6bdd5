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
import asyncpg
import pytest
import yaml
from aiohttp import ClientSession, web
from multidict import CIMultiDict

from api import store as api_store
from api.metrics import ApiMetrics
from api.migrate import migrate
from api.server import ApiServer
from producer import EventSpec, Publisher
from producer.exchange import declare_exchange
from tests.faults import BrokerControl, TcpProxy
from worker.metrics import Metrics
from worker.retry import delay_tiers
from worker.service import Worker
from worker.settings import Settings, settings_from_document
from worker.topology import (
    declare_all,
    endpoint_queue,
    exchange_names,
    legacy_delay_queue,
    queue_names,
)

AMQP_URL = os.environ.get("HOOKLINE_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL = os.environ.get(
    "HOOKLINE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
# HOOKLINE_SECRET_KEY for tests: any 32 bytes.
SECRET_KEY = base64.b64encode(b"k" * 32).decode()
SECRET_A = "whsec_" + base64.b64encode(b"a" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b" * 32).decode()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int = 200


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 whose answers each test scripts per path."""

    base_url: str = ""
    requests: list[Received] = field(default_factory=list)
    # path -> list of (status, headers, delay_s); the last entry repeats.
    scripts: dict[str, list[tuple[int, dict[str, str], float]]] = field(default_factory=dict)
    # path -> f(webhook_id, earlier requests for that id) -> status; wins over scripts.
    deciders: dict[str, Callable[[str, int], int]] = field(default_factory=dict)
    # path -> f(webhook_id, earlier requests) -> (status, headers, body); wins over both.
    answers: dict[str, Callable[[str, int], tuple[int, dict[str, str], bytes]]] = field(
        default_factory=dict
    )
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

    def delivered_ids(self, path: str) -> list[str]:
        """webhook-ids answered 2xx on ``path``, one entry per successful request."""
        return [r.headers["webhook-id"] for r in self.on(path) if r.status < 300]

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
        webhook_id = request.headers.get("webhook-id", "")
        decider = self.deciders.get(path)
        answer = self.answers.get(path)
        headers: dict[str, str] = {}
        delay_s = 0.0
        text = b"answer from the test receiver"
        if answer is not None or decider is not None:
            earlier = sum(1 for r in self.on(path) if r.headers.get("webhook-id") == webhook_id)
            if answer is not None:
                status, headers, text = answer(webhook_id, earlier)
            else:
                assert decider is not None
                status = decider(webhook_id, earlier)
        else:
            steps = self.scripts.get(path, [(200, {}, 0.0)])
            status, headers, delay_s = steps[min(len(self.on(path)), len(steps) - 1)]
        received = Received(path, dict(request.headers), body, time.monotonic(), status)
        self.requests.append(received)
        self.arrived.set()
        if delay_s:
            await asyncio.sleep(delay_s)
        return web.Response(status=status, headers=headers, body=text)


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
    """A config document for tests: loopback allowed, short delays, and neither circuit
    breaker nor operational events unless a test turns them on (they change what a failing
    endpoint's events do and what a ``#`` subscriber receives)."""
    document: dict[str, Any] = {
        "broker": {"url": AMQP_URL, "exchange": exchange, "publish_timeout_s": 5},
        "worker": {"shutdown_timeout_s": 5},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "retry": {"delays_s": [0.2, 0.4]},
        "security": {"require_https": False, "allow_private_networks": True},
        "circuit_breaker": {"enabled": False},
        "operational_events": {"enabled": False},
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

    async def channel(self, on_return_raises: bool = False) -> aio_pika.abc.AbstractChannel:
        """A channel once the connection is up (fault tests restart the broker under it)."""
        await asyncio.wait_for(self.connection.connected.wait(), timeout=60)
        return await self.connection.channel(on_return_raises=on_return_raises)

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, **properties: Any
    ) -> None:
        channel = await self.channel(on_return_raises=True)
        try:
            target = await declare_exchange(channel, exchange)
            properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
            await target.publish(aio_pika.Message(body, **properties), routing_key, timeout=5)
        finally:
            await channel.close()

    async def drain(self, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take (and ack) every message now in ``queue_name``."""
        channel = await self.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            messages = []
            while (message := await queue.get(fail=False, no_ack=True)) is not None:
                messages.append(message)
            return messages
        finally:
            await channel.close()

    async def depth(self, queue_name: str) -> int:
        channel = await self.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            return int(queue.declaration_result.message_count or 0)
        finally:
            await channel.close()

    async def wait_depth(self, queue_name: str, expected: int, timeout_s: float = 5) -> None:
        """Wait for a depth: messages a closed channel held return to a quorum queue
        asynchronously, so a depth read right after a close can still be low."""
        deadline = time.monotonic() + timeout_s
        while (depth := await self.depth(queue_name)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{queue_name} holds {depth} messages, not {expected}")
            await asyncio.sleep(0.05)

    async def declare(self, settings: Settings) -> None:
        """Declare everything a worker for ``settings`` would, without starting one."""
        channel = await self.channel()
        try:
            await declare_all(channel, settings)
        finally:
            await channel.close()

    async def delete_all(self, settings: Settings) -> None:
        channel = await self.channel()
        try:
            legacy = [
                legacy_delay_queue(settings.broker.exchange, endpoint.name, delay)
                for endpoint in settings.endpoints
                for delay in delay_tiers(settings.retry)
            ]
            for name in [*queue_names(settings), *legacy]:
                await channel.queue_delete(name, if_unused=False, if_empty=False)
            for name in exchange_names(settings.broker.exchange):
                await channel.exchange_delete(name)
        finally:
            await channel.close()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    connection = await aio_pika.connect_robust(AMQP_URL, reconnect_interval=0.5)
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
    """``python -m worker run`` as a real child process; killed on exit if still running.

    Its log is read continuously (a full pipe would block the worker) into ``log_lines``.
    """

    def __init__(self, config: Path) -> None:
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.log_lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WorkerProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "run",
            "--config",
            str(self.config),
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read_log())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.process is not None and self._reader is not None
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await asyncio.wait_for(self._reader, timeout=10)

    async def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := (await self.process.stderr.readline()).decode():
            self.log_lines.append(line)
            self._new_line.set()
        self._new_line.set()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def wait_for_log(
        self, event: str, timeout_s: float = 20, after: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Wait until the worker logs ``event`` (after the record ``after``, if given);
        returns that record."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        passed = after is None
        while True:
            for line in self.log_lines[seen:]:
                if not line.startswith("{"):
                    continue
                record = dict(json.loads(line))
                if passed and record.get("event") == event:
                    return record
                passed = passed or record == after
            seen = len(self.log_lines)
            assert self._reader is not None
            if self._reader.done():
                raise AssertionError(f"worker ended before logging {event}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"worker did not log {event} in {timeout_s}s")
            self._new_line.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), timeout=remaining)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    async def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Send ``signum`` and return the exit code once the process has ended."""
        assert self.process is not None and self._reader is not None
        self.process.send_signal(signum)
        code = await asyncio.wait_for(self.process.wait(), timeout=timeout_s)
        await asyncio.wait_for(self._reader, timeout=10)
        return code

    def events(self) -> list[str]:
        return [json.loads(line)["event"] for line in self.log_lines if line.startswith("{")]


@pytest.fixture
async def broker_control() -> AsyncIterator[BrokerControl]:
    """Fault injection on the real broker; RabbitMQ is running and unalarmed afterwards."""
    control = BrokerControl()
    await control.remember_limits()
    try:
        yield control
    finally:
        await control.restore()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    tcp_proxy = TcpProxy()
    await tcp_proxy.start()
    try:
        yield tcp_proxy
    finally:
        await tcp_proxy.close()


def write_config(directory: Path, document: dict[str, Any]) -> Path:
    """Write ``document`` as ``config.yaml`` for a worker process."""
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def run_python(*args: str, timeout_s: float = 60) -> tuple[int, str, str]:
    """Run ``python *args`` in the repository; returns exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def publish_events(exchange: str, count: int, event_type: str, prefix: str) -> list[str]:
    """Publish ``count`` events with ids ``<prefix>-<n>``, all confirmed."""
    async with Publisher(AMQP_URL, exchange) as publisher:
        return await publisher.publish_many(
            EventSpec(event_type, {"n": n}, id=f"{prefix}-{n}") for n in range(count)
        )


@pytest.fixture
async def registry_db() -> AsyncIterator[str]:
    """A PostgreSQL schema of the test's own in the test database, migrated; the URL it
    yields selects it (``?search_path=``). Dropped afterwards."""
    schema = f"hl_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        url = f"{DATABASE_URL}?search_path={schema}"
        connection = await asyncpg.connect(url)
        try:
            await migrate(connection)
        finally:
            await connection.close()
        yield url
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def registry_sections(database_url: str, **registry: Any) -> dict[str, Any]:
    """The config sections that turn the registry on (for make_settings/make_document)."""
    return {
        "registry": {
            "database_url": database_url,
            "secret_key": SECRET_KEY,
            "reconcile_s": 30,
            **registry,
        },
        "api": {"host": "127.0.0.1", "port": 0},
    }


@dataclass
class ApiAnswer:
    status: int
    body: Any
    headers: CIMultiDict[str]


class ApiClient:
    """A running API server (real PostgreSQL, real RabbitMQ) and an admin key."""

    def __init__(self, server: ApiServer, admin_key: str, database_url: str) -> None:
        self.server = server
        self.admin_key = admin_key
        self.database_url = database_url
        self.base_url = f"http://127.0.0.1:{server.port}"
        self.session = ClientSession()
        self.created: set[str] = set()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = "admin",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> ApiAnswer:
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {self.admin_key if key == 'admin' else key}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.base_url + path, data=data, headers=sent
        ) as response:
            text = await response.read()
            parsed = json.loads(text) if response.content_type == "application/json" else text
            answer = ApiAnswer(response.status, parsed, CIMultiDict(response.headers))
        if method == "POST" and path == "/v1/endpoints" and answer.status == 201:
            self.created.add(answer.body["name"])
        return answer

    async def create_key(self, *, tenant: str | None = None, admin: bool = False) -> str:
        connection = await asyncpg.connect(self.database_url)
        try:
            key = await api_store.create_key(
                connection, admin=admin, tenant=tenant, description="test"
            )
        finally:
            await connection.close()
        return key.token


@pytest.fixture
async def api_client(
    registry_db: str, exchange_name: str, broker: Broker
) -> AsyncIterator[ApiClient]:
    """The API on a free loopback port, for this test's exchange and schema; the queues of
    every endpoint it created are deleted afterwards."""
    settings = make_settings(
        exchange_name, [], **registry_sections(registry_db), broker={"queue_type": "classic"}
    )
    server = ApiServer(settings, ApiMetrics())
    await server.start()
    await server.broker_connected()
    connection = await asyncpg.connect(registry_db)
    try:
        admin_key = (
            await api_store.create_key(connection, admin=True, tenant=None, description="test")
        ).token
    finally:
        await connection.close()
    client = ApiClient(server, admin_key, registry_db)
    try:
        yield client
    finally:
        await client.session.close()
        await server.stop()
        channel = await broker.channel()
        try:
            for name in client.created:
                await channel.queue_delete(endpoint_queue(exchange_name, name))
        finally:
            await channel.close()
        await broker.delete_all(settings)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses ``broker_control`` so it can be deselected as a group."""
    for item in items:
        if "broker_control" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker_faults)
