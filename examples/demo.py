"""`make demo`: Hookline end to end on this machine's RabbitMQ and PostgreSQL, in under a minute.

Starts the example receiver (it verifies every signature), starts a worker with the repo's
config.yaml, publishes sample events with the Python SDK, and shows them arriving; the
`flaky` endpoint answers 503, so its events walk through every retry into the
dead-letter queue, which is listed at the end.

Then the control plane, if PostgreSQL answers (postgresql://postgres@127.0.0.1:5432/test,
or HOOKLINE_DEMO_DATABASE_URL): in a schema of its own, which it drops at the end, the demo
migrates, makes an admin key and runs the API (python -m api) beside the worker, which
follows the registry. It creates an endpoint through the API, publishes an event and shows
the receiver verifying it with the secret the API returned; then pauses and resumes the
endpoint, rotates its secret and deletes it, the worker following each change live.
Without PostgreSQL that part is skipped, with a note. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import asyncpg
import yaml
from pydantic import SecretStr

from producer import Publisher
from producer.settings import mask_url
from worker import dlq
from worker.cli_dlq import dead_letters_table
from worker.settings import Settings, load_settings
from worker.topology import endpoint_queue

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.yaml"
SHOWN_FIELDS = (
    "endpoint",
    "attempt",
    "event_type",
    "status",
    "next_delay_s",
    "reason",
    "source",
    "added",
    "changed",
    "removed",
    "port",
    "applied",
)
DATABASE_URL = os.environ.get(
    "HOOKLINE_DEMO_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
# The endpoint the demo creates through the API, and what it subscribes to (no endpoint of
# config.yaml takes these events).
API_ENDPOINT = "signups"
API_EVENTS = ["customer.*"]
WAIT_S = 20.0
# What the pause and resume answers are printed with.
STATE = ("name", "paused", "version", "signing_secrets")


class DemoError(Exception):
    """A step that did not happen in time or failed: the message says which."""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Output:
    """Every child's output, printed as it comes and kept, so the demo can wait for a line
    (a delivery verified, a change applied) instead of sleeping."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._waiting: list[tuple[Callable[[str], bool], asyncio.Future[str]]] = []

    def add(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)
        for wanted, future in self._waiting:
            if not future.done() and wanted(line):
                future.set_result(line)

    def mark(self) -> int:
        return len(self.lines)

    async def wait_for(
        self, wanted: Callable[[str], bool], *, since: int, what: str, timeout_s: float = WAIT_S
    ) -> str:
        """The first line after ``since`` that ``wanted`` accepts."""
        for line in self.lines[since:]:
            if wanted(line):
                return line
        entry = (wanted, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            return await asyncio.wait_for(entry[1], timeout_s)
        except TimeoutError:
            raise DemoError(f"waited {timeout_s:g} s for {what}: see the output above") from None
        finally:
            self._waiting.remove(entry)


def condensed(line: str) -> str:
    """A JSON log line as its event and the fields worth seeing; other lines as they are."""
    if not line.startswith('{"'):
        return line
    record = json.loads(line)
    fields = []
    for key in SHOWN_FIELDS:
        value = record.get(key)
        if isinstance(value, list):
            value = ",".join(map(str, value)) or None
        if value is not None:
            fields.append(f"{key}={value}")
    return f"{record.get('event')} {' '.join(fields)}".rstrip()


async def relay(stream: asyncio.StreamReader, label: str, output: Output) -> None:
    """Print a child's output, condensing the JSON log lines, until it closes."""
    while raw := await stream.readline():
        line = raw.decode(errors="replace").rstrip()
        if line:
            output.add(f"{label} | {condensed(line)}")


@dataclass
class Child:
    label: str
    process: asyncio.subprocess.Process
    relays: list[asyncio.Task[None]]

    async def stop(self) -> int:
        """SIGTERM, then its exit code once its output is read (SIGKILL after 20 s)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            self.process.kill()
        await asyncio.gather(*self.relays)
        return await self.process.wait()


async def spawn(*args: str, env: dict[str, str] | None) -> asyncio.subprocess.Process:
    """``python *args`` in the repository, both outputs piped."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    return process


async def start(output: Output, label: str, *args: str, env: dict[str, str] | None = None) -> Child:
    process = await spawn(*args, env=env)
    assert process.stdout is not None
    assert process.stderr is not None
    label = label.ljust(9)
    return Child(
        label,
        process,
        [
            asyncio.create_task(relay(process.stdout, label, output)),
            asyncio.create_task(relay(process.stderr, label, output)),
        ],
    )


async def run(output: Output, label: str, *args: str, env: dict[str, str] | None = None) -> None:
    """A one-shot command, its output relayed; a failure ends the demo."""
    child = await start(output, label, *args, env=env)
    await asyncio.gather(*child.relays)
    if await child.process.wait() != 0:
        raise DemoError(f"{' '.join(args)} exited {child.process.returncode}")


async def capture(output: Output, label: str, *args: str, env: dict[str, str] | None = None) -> str:
    """A one-shot command's standard output (what it prints once, such as a key); its
    standard error is relayed."""
    process = await spawn(*args, env=env)
    assert process.stdout is not None
    assert process.stderr is not None
    relaying = asyncio.create_task(relay(process.stderr, label.ljust(9), output))
    stdout, _, _ = await asyncio.wait_for(
        asyncio.gather(process.stdout.read(), relaying, process.wait()), WAIT_S
    )
    if process.returncode != 0:
        raise DemoError(f"{' '.join(args)} exited {process.returncode}")
    return bytes(stdout).decode().strip()


async def wait_ready(url: str, child: Child, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and child.process.returncode is None:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise DemoError(f"{what} did not become ready: see its log above")


async def wait_listening(port: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise DemoError(f"nothing listens on 127.0.0.1:{port}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def receiver_arguments(settings: Settings) -> list[str]:
    arguments = [
        "examples/receiver/app.py",
        "--port",
        str(urlsplit(settings.endpoints[0].url).port),
    ]
    for endpoint in settings.endpoints:
        path = urlsplit(endpoint.url).path
        if endpoint.name == "flaky":
            arguments += ["--fail", path]
        else:
            secret = endpoint.secret
            assert isinstance(secret, SecretStr)
            arguments += ["--route", f"{path}={secret.get_secret_value()}"]
    return arguments


# -- the control plane --------------------------------------------------------------------


@dataclass
class ControlPlane:
    """A migrated registry schema, the environment that points the API and the worker at
    it, an admin key, and the API's config (config.yaml on a free port)."""

    schema: str
    env: dict[str, str]
    admin_key: str
    api_config: Path
    api_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


def with_search_path(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


async def database_connection() -> asyncpg.Connection | None:
    try:
        return await asyncpg.connect(DATABASE_URL, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"PostgreSQL does not answer ({exc.__class__.__name__}).", flush=True)
        return None


async def prepare_control_plane(
    output: Output, admin: asyncpg.Connection, directory: Path
) -> ControlPlane:
    schema = f"hookline_demo_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    database_url = with_search_path(DATABASE_URL, schema)
    print(f"created schema {schema}; HOOKLINE_DATABASE_URL={mask_url(database_url)}", flush=True)

    say("python -m api generate-secret-key (HOOKLINE_SECRET_KEY: seals endpoint secrets at rest)")
    secret_key = await capture(output, "api", "-m", "api", "generate-secret-key")
    print(f"HOOKLINE_SECRET_KEY=<{len(secret_key)} characters, kept in the environment>")
    env = {**os.environ, "HOOKLINE_DATABASE_URL": database_url, "HOOKLINE_SECRET_KEY": secret_key}

    say("python -m api --config config.yaml migrate")
    await run(output, "migrate", "-m", "api", "--config", str(CONFIG), "migrate", env=env)

    say("python -m api --config config.yaml create-key --admin (printed once, stored hashed)")
    admin_key = await capture(
        output,
        "create-key",
        "-m",
        "api",
        "--config",
        str(CONFIG),
        "create-key",
        "--admin",
        "--description",
        "demo",
        env=env,
    )
    print(f"HOOKLINE_API_KEY={admin_key[:17]}...", flush=True)

    # config.yaml, with the API on a free port of 127.0.0.1 (api.port is 8080 otherwise).
    api_port = free_port()
    document = yaml.safe_load(CONFIG.read_text())
    document["api"] = {"host": "127.0.0.1", "port": api_port}
    api_config = directory / "api.yaml"
    api_config.write_text(yaml.safe_dump(document, sort_keys=False))
    return ControlPlane(schema, env, admin_key, api_config, api_port)


def shown(body: dict[str, Any]) -> dict[str, Any]:
    """The answer as printed: secrets shortened (the demo passes them on whole)."""
    return {
        key: f"{value[:12]}...(shortened)" if key == "secret" and isinstance(value, str) else value
        for key, value in body.items()
    }


async def call(
    session: aiohttp.ClientSession,
    plane: ControlPlane,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    fields: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One API request, printed like `curl -i` once answered (the key as $HOOKLINE_API_KEY);
    ``fields`` prints those of the answer only."""
    lines = [f"$ curl -sS -i -X {method} {plane.base_url}{path} \\"]
    lines.append('    -H "Authorization: Bearer $HOOKLINE_API_KEY"')
    if body is not None:
        lines[-1] += " -H 'Content-Type: application/json' \\"
        lines.append(f"    -d '{json.dumps(body)}'")
    headers = {"Authorization": f"Bearer {plane.admin_key}"}
    async with session.request(
        method, plane.base_url + path, json=body, headers=headers
    ) as response:
        answer: dict[str, Any] = await response.json()
        lines.append(f"HTTP/1.1 {response.status} {response.reason}")
        lines += [
            f"{name}: {response.headers[name]}"
            for name in ("Location", "ETag")
            if name in response.headers
        ]
        printed = shown(answer if not fields else {key: answer.get(key) for key in fields})
        lines.append(json.dumps(printed, indent=2 if not fields else None))
        print("\n".join(lines), flush=True)
        if response.status >= 300:
            raise DemoError(f"{method} {path} answered {response.status}")
        return answer


def applied(change: str) -> Callable[[str], bool]:
    """A worker's log line saying that it applied a registry change to the API endpoint."""
    return lambda line: (
        line.startswith("worker")
        and "config_reloaded" in line
        and "source=registry" in line
        and f"{change}={API_ENDPOINT}" in line
    )


def verified(event_id: str) -> Callable[[str], bool]:
    return lambda line: "signature verified" in line and event_id in line


async def queued_messages(settings: Settings) -> int:
    """Ready messages in the API endpoint's queue, as RabbitMQ counts them."""
    connection = await aio_pika.connect(settings.broker.connection_url())
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            endpoint_queue(settings.broker.exchange, API_ENDPOINT), passive=True
        )
        return queue.declaration_result.message_count or 0


async def remove_api_endpoint_queue(settings: Settings) -> None:
    """The API keeps a deleted endpoint's queue (events may wait in it); the demo's is
    removed, so that no run leaves one behind."""
    with contextlib.suppress(aio_pika.exceptions.AMQPError, OSError):
        connection = await aio_pika.connect(settings.broker.connection_url())
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(endpoint_queue(settings.broker.exchange, API_ENDPOINT))


async def control_plane_demo(
    output: Output, settings: Settings, plane: ControlPlane, children: list[Child]
) -> None:
    receiver_port = free_port()
    path = f"/webhooks/{API_ENDPOINT}"
    async with (
        aiohttp.ClientSession() as session,
        Publisher.from_settings(settings.broker) as publisher,
    ):

        async def publish(event_type: str, data: dict[str, Any]) -> str:
            event_id = await publisher.publish(event_type, data)
            print(f"published {event_id} {event_type}", flush=True)
            return event_id

        async def start_receiver(secret: str) -> Child:
            receiver = await start(
                output,
                f"receiver:{receiver_port}",
                "examples/receiver/app.py",
                "--port",
                str(receiver_port),
                "--route",
                f"{path}={secret}",
            )
            children.append(receiver)
            await wait_listening(receiver_port)
            return receiver

        say(f"the control plane: POST /v1/endpoints creates '{API_ENDPOINT}'")
        mark = output.mark()
        created = await call(
            session,
            plane,
            "POST",
            "/v1/endpoints",
            {
                "name": API_ENDPOINT,
                "url": f"http://127.0.0.1:{receiver_port}{path}",
                "events": API_EVENTS,
                "description": "created by make demo",
            },
        )
        secret = created["secret"]
        await output.wait_for(applied("added"), since=mark, what="the worker to add it")
        print("(the worker added it live: a PostgreSQL notification, no restart, no reload)")

        say(f"a second receiver, on port {receiver_port}, verifying with the secret returned")
        receiver = await start_receiver(secret)
        mark = output.mark()
        event_id = await publish("customer.created", {"customer_id": "c_42", "plan": "pro"})
        await output.wait_for(verified(event_id), since=mark, what="the signed delivery")
        print(f"(signed with {secret[:12]}..., the secret the API returned once)")

        say(f"POST /v1/endpoints/{API_ENDPOINT}/pause: events wait in its queue")
        mark = output.mark()
        await call(session, plane, "POST", f"/v1/endpoints/{API_ENDPOINT}/pause", fields=STATE)
        await output.wait_for(applied("changed"), since=mark, what="the worker to pause it")
        paused_id = await publish("customer.updated", {"customer_id": "c_42", "plan": "team"})
        await asyncio.sleep(1.5)
        if any(paused_id in line for line in output.lines[mark:]):
            raise DemoError("the paused endpoint received an event")
        waiting = await queued_messages(settings)
        print(f"nothing delivered after 1.5 s; RabbitMQ holds {waiting} in its queue", flush=True)

        say(f"POST /v1/endpoints/{API_ENDPOINT}/resume: the waiting event goes out")
        mark = output.mark()
        await call(session, plane, "POST", f"/v1/endpoints/{API_ENDPOINT}/resume", fields=STATE)
        await output.wait_for(verified(paused_id), since=mark, what="the event held while paused")

        say(f"POST /v1/endpoints/{API_ENDPOINT}/secret/rotate: a new secret, the old one signs on")
        mark = output.mark()
        rotated = await call(
            session,
            plane,
            "POST",
            f"/v1/endpoints/{API_ENDPOINT}/secret/rotate",
            {"grace_s": 3600},
            fields=("name", "secret", "previous_secret_expires_at"),
        )
        await output.wait_for(applied("changed"), since=mark, what="the worker to take it")
        print(
            "(until the grace period ends every request carries both signatures, so receivers"
            " switch when they like: this one restarts with the new secret only)",
            flush=True,
        )
        await receiver.stop()
        children.remove(receiver)
        await start_receiver(rotated["secret"])
        mark = output.mark()
        event_id = await publish("customer.deleted", {"customer_id": "c_42"})
        await output.wait_for(verified(event_id), since=mark, what="the delivery after rotation")

        say(f"DELETE /v1/endpoints/{API_ENDPOINT}")
        mark = output.mark()
        await call(
            session,
            plane,
            "DELETE",
            f"/v1/endpoints/{API_ENDPOINT}",
            fields=("name", "deleted", "queued"),
        )
        await output.wait_for(applied("removed"), since=mark, what="the worker to remove it")


async def main() -> None:
    settings = load_settings(CONFIG)
    output = Output()
    children: list[Child] = []
    plane: ControlPlane | None = None
    admin: asyncpg.Connection | None = None
    directory = tempfile.TemporaryDirectory(prefix="hookline-demo-")
    say(f"clearing earlier demo dead letters from {settings.broker.exchange}.dead-letter")
    print(f"{await dlq.purge(settings)} purged")
    try:
        say(f"the control plane's database: {mask_url(DATABASE_URL)}")
        admin = await database_connection()
        if admin is None:
            print(
                "Skipping the control plane (the API). Start PostgreSQL on 127.0.0.1:5432, or set"
                " HOOKLINE_DEMO_DATABASE_URL, to see it.",
                flush=True,
            )
        else:
            await remove_api_endpoint_queue(settings)
            plane = await prepare_control_plane(output, admin, Path(directory.name))

        registry = " with the registry (HOOKLINE_DATABASE_URL)" if plane else ""
        say(
            "starting the example receiver and a worker"
            f" (python -m worker run --config config.yaml){registry}"
        )
        children.append(await start(output, "receiver", *receiver_arguments(settings)))
        worker = await start(
            output,
            "worker",
            "-m",
            "worker",
            "run",
            "--config",
            str(CONFIG),
            env=plane.env if plane else None,
        )
        children.append(worker)
        api = None
        if plane is not None:
            say(
                f"starting the API (python -m api --config {plane.api_config.name}: config.yaml"
                f" with api.port {plane.api_port})"
            )
            api = await start(
                output, "api", "-m", "api", "--config", str(plane.api_config), env=plane.env
            )
            children.append(api)
        await wait_ready(f"http://127.0.0.1:{settings.metrics.port}/readyz", worker, "the worker")
        if plane is not None and api is not None:
            await wait_ready(f"{plane.base_url}/readyz", api, "the API")

        say("publishing 4 events with the Python SDK (producer.Publisher)")
        async with Publisher.from_settings(settings.broker) as publisher:
            for event_type, data in [
                ("order.created", {"order_id": 1001, "total": "42.00"}),
                ("order.paid", {"order_id": 1001}),
                ("order.created", {"order_id": 1002, "total": "7.50"}),
                ("invoice.paid", {"invoice_id": "inv_77"}),
            ]:
                event_id = await publisher.publish(event_type, data)
                print(f"published {event_id} {event_type}", flush=True)
        total_delay = sum(settings.retry.delays_s)
        say(f"waiting for 'flaky' to exhaust its retries ({settings.retry.delays_s} s)")
        deadline = time.monotonic() + total_delay + 15
        while time.monotonic() < deadline and not await dlq.list_dead_letters(settings):  # noqa: ASYNC110 - polling the broker, no event to wait on
            await asyncio.sleep(0.5)
        say("python -m worker dlq list --config config.yaml")
        print(dead_letters_table(await dlq.list_dead_letters(settings)), flush=True)
        say("python -m worker send-test --endpoint orders (a signed ping, straight to it)")
        await run(
            output,
            "send-test",
            "-m",
            "worker",
            "send-test",
            "--config",
            str(CONFIG),
            "--endpoint",
            "orders",
        )
        if plane is not None:
            await control_plane_demo(output, settings, plane, children)
        say(f"delivery counters from http://127.0.0.1:{settings.metrics.port}/metrics")
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{settings.metrics.port}/metrics"
            async with session.get(url) as response:
                for line in (await response.text()).splitlines():
                    if line.startswith("webhook_deliveries_total") and not line.endswith(" 0.0"):
                        print(line)
    finally:
        say("stopping (SIGTERM): the worker drains and exits 0")
        codes = await asyncio.gather(*(child.stop() for child in children))
        for child, code in zip(children, codes, strict=True):
            if child.label.strip() in ("worker", "api"):
                print(f"{child.label.strip()} exit code {code}")
        if admin is not None:
            await remove_api_endpoint_queue(settings)
            if plane is not None:
                await admin.execute(f'DROP SCHEMA IF EXISTS "{plane.schema}" CASCADE')
                print(f"dropped schema {plane.schema}")
            await admin.close()
        directory.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except DemoError as exc:
        sys.exit(f"demo failed: {exc}")
