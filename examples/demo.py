"""`make demo`: Hookline end to end on this machine's RabbitMQ, in about half a minute.

Starts the example receiver (it verifies every signature), starts a worker with the repo's
config.yaml, publishes sample events with the Python SDK, and shows them arriving; the
`flaky` endpoint answers 503, so its events walk through every retry into the
dead-letter queue, which is listed at the end.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from pydantic import SecretStr

from producer import Publisher
from worker import dlq
from worker.cli_dlq import dead_letters_table
from worker.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.yaml"
SHOWN_FIELDS = ("endpoint", "attempt", "event_type", "status", "next_delay_s", "reason")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def relay(stream: asyncio.StreamReader, label: str) -> None:
    """Print a child's output, condensing the worker's JSON log lines."""
    while line := (await stream.readline()).decode().rstrip():
        if line.startswith('{"'):
            record = json.loads(line)
            fields = " ".join(f"{k}={record[k]}" for k in SHOWN_FIELDS if k in record)
            line = f"{record.get('event')} {fields}".rstrip()
        print(f"{label} | {line}", flush=True)


async def start(
    label: str, *args: str
) -> tuple[asyncio.subprocess.Process, list[asyncio.Task[None]]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    return process, [
        asyncio.create_task(relay(process.stdout, label)),
        asyncio.create_task(relay(process.stderr, label)),
    ]


async def wait_ready(port: int, worker: asyncio.subprocess.Process, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and worker.returncode is None:
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the worker did not become ready: see its log above")


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


async def main() -> None:
    settings = load_settings(CONFIG)
    say(f"clearing earlier demo dead letters from {settings.broker.exchange}.dead-letter")
    print(f"{await dlq.purge(settings)} purged")
    say("starting the example receiver and a worker (python -m worker run --config config.yaml)")
    receiver, receiver_tasks = await start("receiver", *receiver_arguments(settings))
    worker, worker_tasks = await start("worker  ", "-m", "worker", "run", "--config", str(CONFIG))
    try:
        await wait_ready(settings.metrics.port, worker)
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
        ping = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "send-test",
            "--config",
            str(CONFIG),
            "--endpoint",
            "orders",
            cwd=ROOT,
        )
        await ping.wait()
        say(f"delivery counters from http://127.0.0.1:{settings.metrics.port}/metrics")
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{settings.metrics.port}/metrics"
            async with session.get(url) as response:
                for line in (await response.text()).splitlines():
                    if line.startswith("webhook_deliveries_total") and not line.endswith(" 0.0"):
                        print(line)
    finally:
        say("stopping (SIGTERM): the worker drains and exits 0")
        for process in (worker, receiver):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*worker_tasks, *receiver_tasks)
        print(f"worker exit code {await worker.wait()}")
        await receiver.wait()


if __name__ == "__main__":
    asyncio.run(main())
