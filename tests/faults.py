"""Fault injection against the real broker: restarts, alarms, cut and silent connections.

Everything here restores the broker before it returns; the ``broker_control`` fixture
checks again after each test, so a failing test cannot leave RabbitMQ stopped or alarmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672
START_NODE = (
    'if [ "$(id -u)" = 0 ]; then'
    " su rabbitmq -s /bin/sh -c 'ulimit -n $(ulimit -Hn); rabbitmq-server -detached';"
    " else ulimit -n $(ulimit -Hn); rabbitmq-server -detached; fi"
)


async def rabbitmqctl(*args: str, timeout_s: float = 120) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {stderr.decode().strip()}")
    return stdout.decode()


async def broker_answers() -> bool:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(BROKER_HOST, BROKER_PORT), timeout=2
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


class BrokerControl:
    """Stops, starts and alarms the machine's RabbitMQ, always putting it back."""

    def __init__(self) -> None:
        self._watermark = "0.4"
        self._disk_limit = "50000000"

    async def remember_limits(self) -> None:
        self._watermark = (
            await rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
        ).strip()
        self._disk_limit = (
            await rabbitmqctl("eval", "rabbit_disk_monitor:get_disk_free_limit().")
        ).strip()

    async def stop_app(self) -> None:
        await rabbitmqctl("stop_app")

    async def start_app(self) -> None:
        await rabbitmqctl("start_app")
        await rabbitmqctl("await_startup")

    async def restart_server(self) -> None:
        """A full restart of the RabbitMQ node (the Erlang VM), not just the application."""
        await rabbitmqctl("stop")
        await self.start_server()

    async def start_server(self) -> None:
        """Start the node with the open-file hard limit as its soft limit: run as root,
        ``rabbitmq-server -detached`` switches user and gets 1,024 files, and such a node
        silently stops answering once a few hundred quorum queues exist."""
        process = await asyncio.create_subprocess_exec("sh", "-c", START_NODE)
        await process.wait()
        # await_startup fails until the node itself is up, so ask again for a while.
        for _ in range(60):
            try:
                await rabbitmqctl("await_startup", "--timeout", "60", timeout_s=90)
                return
            except RuntimeError:
                await asyncio.sleep(2)
        raise RuntimeError("RabbitMQ did not start within two minutes")

    @contextlib.asynccontextmanager
    async def memory_alarm(self) -> AsyncIterator[None]:
        """Block every publishing connection, as a broker over its memory watermark does."""
        await rabbitmqctl("set_vm_memory_high_watermark", "0.000001")
        try:
            yield
        finally:
            await rabbitmqctl("set_vm_memory_high_watermark", self._watermark)

    @contextlib.asynccontextmanager
    async def disk_alarm(self) -> AsyncIterator[None]:
        await rabbitmqctl("set_disk_free_limit", "100000GB")
        try:
            yield
        finally:
            await rabbitmqctl("set_disk_free_limit", self._disk_limit)

    async def close_connections(self, name_contains: str) -> int:
        """Close (server side) every connection whose client name contains ``name_contains``."""
        closed = 0
        for line in (
            await rabbitmqctl("list_connections", "pid", "client_properties")
        ).splitlines():
            if name_contains in line:
                await rabbitmqctl("close_connection", line.split()[0], "closed by a fault test")
                closed += 1
        return closed

    async def restore(self) -> None:
        """Whatever a test did: broker running, application started, no alarms."""
        if not await broker_answers():
            with contextlib.suppress(RuntimeError):
                await self.start_app()
        if not await broker_answers():
            await self.start_server()
        await rabbitmqctl("set_vm_memory_high_watermark", self._watermark)
        await rabbitmqctl("set_disk_free_limit", self._disk_limit)


class TcpProxy:
    """A loopback TCP proxy to the broker (or another ``upstream``) that a test can cut,
    silence or make refuse connections.

    ``cut()`` aborts every connection (an RST, no AMQP close); ``freeze()`` keeps the
    sockets open but stops forwarding, like a peer that vanished without a word, which only
    heartbeats detect. New connections always go through.
    """

    def __init__(self, upstream: tuple[str, int] = (BROKER_HOST, BROKER_PORT)) -> None:
        self.port = 0
        self._upstream = upstream
        # While set, new connections are closed at once: a server that is down.
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, asyncio.Event]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections_seen = 0

    async def start(self, ssl_context: ssl.SSLContext | None = None, port: int = 0) -> None:
        """Listen on 127.0.0.1 (``port``, or any free one); with ``ssl_context``, terminate
        TLS (an amqps:// front)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_seen += 1
        if self.refusing:
            writer.transport.abort()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        flowing = asyncio.Event()
        flowing.set()
        self._links.append((writer, upstream_writer, flowing))
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink, flowing))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, flowing: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                await flowing.wait()
                sink.write(data)
                await sink.drain()
            # A frozen link passes on nothing, not even a close.
            await flowing.wait()
        with contextlib.suppress(OSError, RuntimeError):
            sink.close()

    def cut(self) -> None:
        for client, upstream, _ in self._links:
            for writer in (client, upstream):
                writer.transport.abort()
        self._links.clear()

    def freeze(self) -> None:
        """Silence the current connections: bytes stop flowing, sockets stay open."""
        for _, _, flowing in self._links:
            flowing.clear()
        self._frozen = list(self._links)
        self._links.clear()

    async def close(self) -> None:
        for client, upstream, flowing in [*self._links, *getattr(self, "_frozen", [])]:
            flowing.set()
            for writer in (client, upstream):
                writer.transport.abort()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
