"""Worker lifecycle: health endpoints, metrics, broker outage at start, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme
from structlog.testing import capture_logs

from producer import Publisher
from tests.conftest import (
    AMQP_URL,
    Broker,
    Receiver,
    RunWorker,
    WorkerProcess,
    endpoint,
    eventually,
    make_document,
    make_settings,
    publish_events,
    write_config,
)
from tests.faults import BrokerControl, TcpProxy
from tests.helpers import as_async
from worker.metrics import Metrics
from worker.service import Worker
from worker.settings import Settings, settings_from_document
from worker.topology import dead_letter_queue, endpoint_queue, queue_names


async def get(port: int | None, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as r,
    ):
        return r.status, await r.text()


async def test_health_ready_and_metrics(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """/healthz and /readyz answer 200 while consuming; /metrics has the contract series
    (per endpoint for endpoints with metrics_detail, retries waiting per shared tier)."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("ok", receiver.url("/ok"), ["m.*"], metrics_detail=True),
            endpoint("bad", receiver.url("/bad"), ["m.*"], metrics_detail=True),
        ],
        retry={"delays_s": [0.1]},
        metrics={"queue_poll_s": 0.2},
    )
    receiver.script("/bad", 500)
    worker = await run_worker(settings)
    port = worker.health.port
    assert (await get(port, "/healthz"))[0] == 200
    assert (await get(port, "/readyz"))[0] == 200
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        await publisher.publish("m.x", {})
    await receiver.wait_for(lambda: len(receiver.on("/bad")) == 2 and len(receiver.on("/ok")) == 1)
    await asyncio.sleep(0.3)
    status, text = await get(port, "/metrics")
    assert status == 200
    expected = [
        'webhook_deliveries_total{endpoint="ok",outcome="delivered"} 1.0',
        'webhook_deliveries_total{endpoint="bad",outcome="retried"} 1.0',
        'webhook_deliveries_total{endpoint="bad",outcome="dead_lettered"} 1.0',
        'webhook_dead_lettered_total{endpoint="bad",reason="attempts_exhausted"} 1.0',
        'webhook_attempts_total{endpoint="bad",status_class="5xx"} 2.0',
        'webhook_delivery_duration_seconds_count{endpoint="ok"} 1.0',
        'webhook_end_to_end_seconds_count{endpoint="ok"} 1.0',
        'webhook_in_flight{endpoint="ok"} 0.0',
        "webhook_broker_connected 1.0",
        "webhook_worker_ready 1.0",
        "webhook_dead_letter_messages 1.0",
        "webhook_unrouted_messages 0.0",
        'webhook_backlog_messages{endpoint="ok"} 0.0',
        'webhook_retry_waiting_messages{tier="100ms"} 0.0',
    ]
    for line in expected:
        assert line in text, line
    assert "127.0.0.1" not in text  # no URL ever becomes a label
    assert "evt_" not in text


async def test_unreachable_broker_at_start_is_retried_not_fatal() -> None:
    """With no broker, the worker keeps retrying with /readyz 503 and stops cleanly on request."""
    settings = make_settings(
        "hl-unreachable",
        [endpoint("e", "http://127.0.0.1/", ["#"])],
        broker={"url": "amqp://guest:guest@127.0.0.1:1/"},
    )
    worker = Worker(settings, Metrics())
    task = asyncio.create_task(worker.run())

    async def serving() -> bool:
        return worker.health.port is not None

    await eventually(serving)
    await asyncio.sleep(1.5)  # several connection attempts
    assert not task.done()
    assert (await get(worker.health.port, "/healthz"))[0] == 200
    status, body = await get(worker.health.port, "/readyz")
    assert (status, "not ready" in body) == (503, True)
    worker.request_stop()
    await asyncio.wait_for(task, timeout=5)


async def test_stop_drains_in_flight_and_returns_the_rest(
    exchange_name: str, receiver: Receiver, broker: Broker, run_worker: RunWorker
) -> None:
    """On stop, started deliveries finish and are acked; unstarted ones stay queued."""
    settings = make_settings(
        exchange_name,
        [endpoint("slow", receiver.url("/slow"), ["d.*"], max_in_flight=3, metrics_detail=True)],
        worker={"shutdown_timeout_s": 10},
    )
    receiver.script("/slow", (200, {}, 1.0))
    worker = await run_worker(settings)
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        for index in range(10):
            await publisher.publish("d.x", {"i": index})
    await receiver.wait_for(lambda: len(receiver.requests) == 3)
    stopping = asyncio.create_task(run_worker.stop(worker, timeout_s=10))
    await asyncio.sleep(0)
    assert not worker.is_ready()
    await stopping
    assert len(receiver.requests) == 3  # nothing new started after the stop
    await broker.wait_depth(endpoint_queue(exchange_name, "slow"), 7)
    delivered = worker.metrics.deliveries.labels(endpoint="slow", outcome="delivered")
    assert delivered._value.get() == 3


async def test_stop_is_bounded_by_shutdown_timeout(
    exchange_name: str, receiver: Receiver, broker: Broker, run_worker: RunWorker
) -> None:
    """A delivery that outlives shutdown_timeout_s is abandoned unacked and redelivered later."""
    settings = make_settings(
        exchange_name,
        [endpoint("hang", receiver.url("/hang"), ["h.*"], timeout_s=60)],
        worker={"shutdown_timeout_s": 0.5},
    )
    receiver.script("/hang", (200, {}, 60.0))
    worker = await run_worker(settings)
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        await publisher.publish("h.x", {})
    await receiver.wait_for(lambda: len(receiver.requests) == 1)
    started = time.monotonic()
    await run_worker.stop(worker, timeout_s=10)
    assert time.monotonic() - started < 5
    await broker.wait_depth(endpoint_queue(exchange_name, "hang"), 1)


# Faults: each test injects a real fault and counts every event (published, delivered,
# duplicated, dead-lettered, lost); the figures are printed for docs/reliability.md.


def report(fault: str, **figures: object) -> None:
    print(f"\nRELIABILITY {fault}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


async def queues_empty(broker: Broker, settings: Settings) -> bool:
    for name in queue_names(settings):
        if name.endswith((".dead-letter", ".unrouted", ".delay-tiers")):
            continue  # .delay-tiers holds the delay-tier manifest, never events
        if await broker.depth(name):
            return False
    return True


def duplicates(ids: list[str]) -> int:
    return len(ids) - len(set(ids))


async def test_worker_killed_mid_load_loses_nothing(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker, run_worker: RunWorker
) -> None:
    """SIGKILL with deliveries in flight and retries pending: a new worker delivers every event."""
    max_in_flight = 20
    document = make_document(
        exchange_name,
        [endpoint("ep", receiver.url("/ep"), ["load.*"], max_in_flight=max_in_flight)],
        retry={"delays_s": [0.5, 1.0]},
    )
    # Every fifth event fails its first attempt, so some are mid-retry at the kill.
    receiver.deciders["/ep"] = lambda webhook_id, earlier: (
        500 if earlier == 0 and webhook_id.endswith(("0", "5")) else 200
    )
    settings = settings_from_document(document, Path("x"), {})
    async with WorkerProcess(write_config(tmp_path, document)) as first:
        await first.wait_for_log("worker_consuming")
        ids = await publish_events(exchange_name, 1200, "load.tick", "kill")
        await receiver.wait_for(lambda: len(receiver.delivered_ids("/ep")) >= 400, timeout_s=60)
        first.kill()
    at_kill = len(receiver.delivered_ids("/ep"))
    await run_worker(settings)
    await receiver.wait_for(lambda: set(receiver.delivered_ids("/ep")) >= set(ids), timeout_s=90)
    await eventually(lambda: queues_empty(broker, settings), timeout_s=10)
    delivered = receiver.delivered_ids("/ep")
    dead = await broker.depth(dead_letter_queue(exchange_name))
    report(
        "worker SIGKILL",
        published=len(ids),
        delivered_before_kill=at_kill,
        delivered=len(set(delivered)),
        duplicated=duplicates(delivered),
        dead_lettered=dead,
        lost=len(set(ids) - set(delivered)),
    )
    assert dead == 0
    # Only deliveries in flight at the kill (at most max_in_flight) can be repeated.
    assert duplicates(delivered) <= max_in_flight


class ReadinessWatch:
    """Polls /readyz every 50 ms and keeps the sequence of distinct answers."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self.states: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReadinessWatch:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                status, _ = await get(self.port, "/readyz")
                if not self.states or self.states[-1] != status:
                    self.states.append(status)
            await asyncio.sleep(0.05)


async def publish_steadily(exchange: str, count: int, prefix: str, interval_s: float) -> list[str]:
    """Publish one event every ``interval_s``; returns the ids the broker confirmed."""
    confirmed = []
    async with Publisher(AMQP_URL, exchange, confirm_timeout_s=5, retry_for_s=120) as publisher:
        for n in range(count):
            confirmed.append(
                await publisher.publish("steady.tick", {"n": n}, event_id=f"{prefix}-{n}")
            )
            await asyncio.sleep(interval_s)
    return confirmed


@pytest.mark.parametrize("restart", ["stop_app", "full_restart"])
async def test_broker_restart_while_consuming_and_publishing(
    restart: str,
    exchange_name: str,
    receiver: Receiver,
    broker: Broker,
    run_worker: RunWorker,
    broker_control: BrokerControl,
) -> None:
    """The same worker reconnects by itself, /readyz goes 503 then 200, and nothing is lost."""
    settings = make_settings(
        exchange_name,
        [endpoint("ep", receiver.url("/ep"), ["steady.*"])],
        broker={"heartbeat_s": 5},
    )
    worker = await run_worker(settings)
    async with ReadinessWatch(worker.health.port) as readiness:
        publishing = asyncio.create_task(publish_steadily(exchange_name, 300, restart, 0.01))
        await receiver.wait_for(lambda: len(receiver.requests) >= 50, timeout_s=30)
        if restart == "stop_app":
            await broker_control.stop_app()
            await asyncio.sleep(1)
            await broker_control.start_app()
        else:
            await broker_control.restart_server()
        ids = await asyncio.wait_for(publishing, timeout=180)
        await receiver.wait_for(
            lambda: set(receiver.delivered_ids("/ep")) >= set(ids), timeout_s=90
        )
        await eventually(worker_ready(worker), timeout_s=30)
        await asyncio.sleep(0.2)
    delivered = receiver.delivered_ids("/ep")
    report(
        f"broker {restart}",
        published=len(ids),
        delivered=len(set(delivered)),
        duplicated=duplicates(delivered),
        lost=len(set(ids) - set(delivered)),
        readyz=readiness.states,
    )
    assert 503 in readiness.states
    assert readiness.states[0] == readiness.states[-1] == 200


def worker_ready(worker: Worker) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return worker.is_ready()

    return check


@pytest.mark.parametrize("fault", ["cut", "silent_peer", "close_connection"])
async def test_connection_lost_without_clean_close(
    fault: str,
    exchange_name: str,
    receiver: Receiver,
    run_worker: RunWorker,
    proxy: TcpProxy,
    broker_control: BrokerControl,
) -> None:
    """A cut TCP connection, a silent peer (found by heartbeats) or a server-side close: the
    worker reconnects by itself and delivers everything published before and after."""
    settings = make_settings(
        exchange_name,
        [endpoint("ep", receiver.url("/ep"), ["conn.*"])],
        broker={"url": f"amqp://guest:guest@127.0.0.1:{proxy.port}/", "heartbeat_s": 1},
    )
    worker = await run_worker(settings)
    before = await publish_events(exchange_name, 100, "conn.tick", f"{fault}-before")
    await receiver.wait_for(lambda: set(receiver.delivered_ids("/ep")) >= set(before))
    connections = proxy.connections_seen
    started = time.monotonic()
    async with ReadinessWatch(worker.health.port) as readiness:
        if fault == "cut":
            proxy.cut()
        elif fault == "silent_peer":
            proxy.freeze()
        else:
            assert await broker_control.close_connections(
                f"hookline-worker consume {exchange_name}"
            )
        await eventually(lambda: _reconnected(proxy, connections, worker), timeout_s=30)
        recovered_s = time.monotonic() - started
        after = await publish_events(exchange_name, 100, "conn.tick", f"{fault}-after")
        await receiver.wait_for(lambda: set(receiver.delivered_ids("/ep")) >= set(after))
    delivered = receiver.delivered_ids("/ep")
    report(
        f"connection {fault}",
        published=len(before) + len(after),
        delivered=len(set(delivered)),
        duplicated=duplicates(delivered),
        lost=len(set(before + after) - set(delivered)),
        recovered_s=round(recovered_s, 1),
        readyz=readiness.states,
    )
    # The reconnect follows the loss within milliseconds, often between two /readyz polls,
    # so the worker's own count of reconnects is what proves it noticed and recovered.
    reconnects = worker.metrics.registry.get_sample_value("webhook_broker_reconnects_total")
    assert reconnects is not None and reconnects >= 1


async def _reconnected(proxy: TcpProxy, connections_before: int, worker: Worker) -> bool:
    return proxy.connections_seen > connections_before and worker.is_ready()


async def test_sigterm_under_load_then_restart_has_no_duplicates(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """SIGTERM mid-load: exit 0 with in-flight work finished; a restarted worker delivers the
    rest, and no event is delivered twice."""
    document = make_document(
        exchange_name,
        [endpoint("ep", receiver.url("/ep"), ["term.*"], max_in_flight=20)],
        worker={"shutdown_timeout_s": 10},
    )
    receiver.script("/ep", (200, {}, 0.02))
    config = write_config(tmp_path, document)
    settings = settings_from_document(document, Path("x"), {})
    try:
        async with WorkerProcess(config) as first:
            await first.wait_for_log("worker_consuming")
            ids = await publish_events(exchange_name, 1000, "term.tick", "term")
            await receiver.wait_for(lambda: len(receiver.requests) >= 200, timeout_s=60)
            assert await first.stop() == 0
        at_stop = len(receiver.delivered_ids("/ep"))
        left = len(ids) - at_stop
        await broker.wait_depth(endpoint_queue(exchange_name, "ep"), left)
        async with WorkerProcess(config) as second:
            await second.wait_for_log("worker_consuming")
            await receiver.wait_for(
                lambda: set(receiver.delivered_ids("/ep")) >= set(ids), timeout_s=90
            )
            assert await second.stop() == 0
    finally:
        await broker.delete_all(settings)
    delivered = receiver.delivered_ids("/ep")
    report(
        "SIGTERM under load",
        published=len(ids),
        delivered_by_first=at_stop,
        left_queued=left,
        delivered=len(set(delivered)),
        duplicated=duplicates(delivered),
        lost=len(set(ids) - set(delivered)),
    )
    assert duplicates(delivered) == 0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
async def test_long_outage_at_scale_keeps_memory_flat_and_others_flowing(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """20,000 events cycle through every retry for a dead endpoint: worker RSS stays flat,
    another endpoint keeps delivering, queues hold no more than was published."""
    dead_count, fast_count = 20_000, 2_000
    document = make_document(
        exchange_name,
        [
            endpoint("dead", "http://127.0.0.1:9/refused", ["dead.#"], max_in_flight=100),
            endpoint("fast", receiver.url("/fast"), ["fast.#"]),
        ],
        retry={"delays_s": [0.5, 1.0]},
        metrics={"queue_poll_s": 1},
    )
    settings = settings_from_document(document, Path("x"), {})
    names = queue_names(settings)
    try:
        async with WorkerProcess(write_config(tmp_path, document)) as worker:
            await worker.wait_for_log("worker_consuming")
            pid = worker.pid
            await asyncio.sleep(1)
            rss_start = rss_mb(pid)
            dead_ids = await publish_events(exchange_name, dead_count, "dead.tick", "dead")
            fast_started = time.monotonic()
            fast_ids = await publish_events(exchange_name, fast_count, "fast.tick", "fast")
            await receiver.wait_for(
                lambda: len(set(receiver.delivered_ids("/fast"))) >= fast_count, timeout_s=120
            )
            fast_s = time.monotonic() - fast_started
            rss_peak, depth_peak = rss_start, 0
            dead_letter = dead_letter_queue(exchange_name)
            deadline = time.monotonic() + 300
            while await broker.depth(dead_letter) < dead_count:
                assert time.monotonic() < deadline, "dead letters did not all arrive"
                rss_peak = max(rss_peak, rss_mb(pid))
                depths = [await broker.depth(name) for name in names if name != dead_letter]
                depth_peak = max(depth_peak, sum(depths))
                await asyncio.sleep(0.5)
            rss_end = rss_mb(pid)
            assert await worker.stop() == 0
        letters = await broker.drain(dead_letter)
    finally:
        await broker.delete_all(settings)
    dead_letter_ids = [json.loads(m.body)["id"] for m in letters]
    report(
        "long outage at scale",
        published=dead_count + fast_count,
        dead_lettered=len(dead_letter_ids),
        duplicated_in_dlq=duplicates(dead_letter_ids),
        fast_delivered=len(set(receiver.delivered_ids("/fast"))),
        fast_rate_per_s=round(fast_count / fast_s),
        rss_start_mb=round(rss_start, 1),
        rss_peak_mb=round(rss_peak, 1),
        rss_end_mb=round(rss_end, 1),
        queue_depth_peak=depth_peak,
        lost=len(set(dead_ids) - set(dead_letter_ids))
        + len(set(fast_ids) - set(receiver.delivered_ids("/fast"))),
    )
    assert sorted(dead_letter_ids) == sorted(dead_ids)
    assert depth_peak <= dead_count + fast_count
    assert rss_end <= rss_start * 1.5 + 20, (rss_start, rss_end)


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A private CA, a broker certificate for 'localhost' and a client certificate."""
    authority = trustme.CA()
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "server", "client", "client_key")}
    authority.cert_pem.write_to_path(str(files["ca"]))
    authority.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
        str(files["server"])
    )
    client = authority.issue_cert("hookline-worker")
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return files


async def test_amqps_with_verified_broker_and_client_certificate(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, tls_files: dict[str, Path]
) -> None:
    """Over amqps:// the broker's certificate is verified against broker.tls.ca_file and the
    client certificate is presented; worker and SDK deliver through it."""
    front = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls_files["ca"]))
    front.load_cert_chain(str(tls_files["server"]))
    front.verify_mode = ssl.CERT_REQUIRED  # the broker insists on a client certificate
    tls_front = TcpProxy()
    await tls_front.start(ssl_context=front)
    try:
        tls = {
            "ca_file": str(tls_files["ca"]),
            "cert_file": str(tls_files["client"]),
            "key_file": str(tls_files["client_key"]),
        }
        url = f"amqps://guest:guest@localhost:{tls_front.port}/"
        settings = make_settings(
            exchange_name,
            [endpoint("ep", receiver.url("/ep"), ["tls.*"])],
            broker={"url": url, "tls": tls},
        )
        await run_worker(settings)
        async with Publisher.from_settings(settings.broker) as publisher:
            event_id = await publisher.publish("tls.ok", {})
        await receiver.wait_for(lambda: event_id in receiver.delivered_ids("/ep"))
        assert tls_front.connections_seen >= 3  # worker consume + publish, SDK

        for missing in (("ca_file",), ("cert_file", "key_file")):
            partial = {k: v for k, v in tls.items() if k not in missing}
            refused = make_settings(
                exchange_name,
                [endpoint("ep", receiver.url("/ep"), ["#"])],
                broker={"url": url, "tls": partial},
            )
            worker = Worker(refused, Metrics())
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(1.5)
            assert not worker.is_ready(), missing  # refused, and still retrying
            worker.request_stop()
            await asyncio.wait_for(task, timeout=10)
    finally:
        await tls_front.close()


async def test_a_connection_lost_while_starting_is_retried_from_the_start(
    exchange_name: str, receiver: Receiver, broker: Broker, proxy: TcpProxy
) -> None:
    """The connection cut while the worker declares its endpoints (RabbitMQ itself closes a
    connection on a race in a just-declared quorum queue when several workers start at
    once): the worker logs broker_unreachable and starts again, instead of exiting."""
    names = [f"e{index}" for index in range(40)]
    settings = make_settings(
        exchange_name,
        [endpoint(name, receiver.url(f"/{name}"), [f"{name}.#"]) for name in names],
        broker={"url": f"amqp://guest:guest@127.0.0.1:{proxy.port}/"},
    )
    worker = Worker(settings, Metrics())
    with capture_logs() as logs:
        task = asyncio.create_task(worker.run())
        try:
            await eventually(as_async(lambda: proxy.connections_seen >= 2), timeout_s=20)
            await asyncio.sleep(0.05)
            assert not worker.is_ready()
            proxy.cut()
            await eventually(as_async(worker.is_ready), timeout_s=60)
            await publish_events(exchange_name, 1, "e39.event", "after-cut")
            await receiver.wait_for(lambda: receiver.delivered_ids("/e39") == ["after-cut-0"])
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, timeout=30)
            await broker.delete_all(settings)
    assert "broker_unreachable" in {entry["event"] for entry in logs}


async def test_stop_is_honoured_while_the_broker_is_away(
    exchange_name: str, receiver: Receiver, broker: Broker, proxy: TcpProxy
) -> None:
    """With the broker unreachable (every connection cut, none accepted), SIGTERM still
    ends the worker within the shutdown bound: cancelling its consumers does not wait for a
    broker that is not coming back."""
    names = [f"e{index}" for index in range(6)]
    settings = make_settings(
        exchange_name,
        [endpoint(name, receiver.url(f"/{name}"), [f"{name}.#"]) for name in names],
        broker={"url": f"amqp://guest:guest@127.0.0.1:{proxy.port}/"},
        worker={"shutdown_timeout_s": 2},
    )
    worker = Worker(settings, Metrics())
    task = asyncio.create_task(worker.run())
    try:
        await eventually(as_async(worker.is_ready), timeout_s=30)
        await proxy.close()
        await eventually(as_async(lambda: not worker.is_ready()), timeout_s=10)
        started = time.monotonic()
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)
        assert time.monotonic() - started < 15
    finally:
        if not task.done():
            task.cancel()
        await broker.delete_all(settings)
