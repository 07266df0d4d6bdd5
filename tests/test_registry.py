"""Workers following the registry: endpoints created, changed, paused and deleted through
the API reach real workers without a restart; a database outage never stops deliveries.
Real PostgreSQL (a schema per test), real RabbitMQ, real receivers on loopback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import ClientSession
from structlog.testing import capture_logs

from producer import EventSpec, Publisher
from tests.conftest import (
    AMQP_URL,
    DATABASE_URL,
    ApiClient,
    Broker,
    Receiver,
    RunWorker,
    eventually,
    make_settings,
    registry_sections,
)
from tests.faults import TcpProxy
from tests.helpers import as_async, was_logged
from worker.service import Worker
from worker.settings import Settings
from worker.signing import SigningKey
from worker.topology import endpoint_queue


def worker_settings(
    api_client: ApiClient, database_url: str | None = None, **registry: Any
) -> Settings:
    """A worker for the API's exchange and schema (through ``database_url`` if given)."""
    return make_settings(
        api_client.server.settings.broker.exchange,
        [],
        **registry_sections(database_url or api_client.database_url, **registry),
        broker={"queue_type": "classic"},
    )


async def publish(exchange: str, event_type: str, event_id: str, data: Any = None) -> None:
    async with Publisher(AMQP_URL, exchange) as publisher:
        await publisher.publish_many([EventSpec(event_type, data or {}, id=event_id)])


def received_ids(receiver: Receiver, path: str) -> list[str]:
    return [request.headers["webhook-id"] for request in receiver.on(path)]


def signatures(receiver: Receiver, path: str) -> list[str]:
    return receiver.on(path)[-1].headers["webhook-signature"].split(" ")


def verify(secret: str, receiver: Receiver, path: str) -> bool:
    request = receiver.on(path)[-1]
    signed = f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.".encode()
    return SigningKey.parse(secret).signature(signed + request.body) in signatures(receiver, path)


async def test_an_endpoint_created_through_the_api_receives_events_at_once(
    api_client: ApiClient, run_worker: RunWorker, receiver: Receiver
) -> None:
    """Created while a worker runs: an event published right after the 201 is delivered,
    signed with the secret the API returned."""
    worker = await run_worker(worker_settings(api_client))
    created = await api_client.call(
        "POST",
        "/v1/endpoints",
        {
            "name": "live",
            "url": f"{receiver.base_url}/live",
            "events": ["order.*"],
            "headers": {"Authorization": "Bearer receiver-token"},
        },
    )
    exchange = api_client.server.settings.broker.exchange
    await publish(exchange, "order.created", "evt-1")
    await eventually(as_async(lambda: received_ids(receiver, "/live") == ["evt-1"]))
    assert verify(created.body["secret"], receiver, "/live")
    assert receiver.on("/live")[0].headers["Authorization"] == "Bearer receiver-token"
    # At rest, the header value is sealed like the secret.
    connection = await asyncpg.connect(api_client.database_url)
    try:
        stored = await connection.fetchval(
            "SELECT headers::text FROM endpoints WHERE name = 'live'"
        )
    finally:
        await connection.close()
    assert "receiver-token" not in stored
    assert created.body["secret"] not in stored
    assert "live" in {consumer.endpoint.name for consumer in worker._endpoints.consumers}


async def test_changes_reach_the_worker_url_secret_pause_delete(
    api_client: ApiClient, run_worker: RunWorker, receiver: Receiver, broker: Broker
) -> None:
    """A new URL is used for the next event; a rotated secret signs beside the old one
    until the grace ends, then alone; a paused endpoint queues without sending and
    delivers on resume; a deleted one is no longer consumed."""
    await run_worker(worker_settings(api_client))
    exchange = api_client.server.settings.broker.exchange
    first = await api_client.call(
        "POST", "/v1/endpoints", {"name": "c", "url": f"{receiver.base_url}/a", "events": ["e"]}
    )
    await api_client.call("PATCH", "/v1/endpoints/c", {"url": f"{receiver.base_url}/b"})
    await publish(exchange, "e", "evt-url")
    await eventually(as_async(lambda: received_ids(receiver, "/b") == ["evt-url"]))
    assert receiver.on("/a") == []

    rotated = await api_client.call("POST", "/v1/endpoints/c/secret/rotate", {"grace_s": 2})
    await publish(exchange, "e", "evt-both")
    await eventually(as_async(lambda: "evt-both" in received_ids(receiver, "/b")))
    assert len(signatures(receiver, "/b")) == 2
    assert verify(first.body["secret"], receiver, "/b")
    assert verify(rotated.body["secret"], receiver, "/b")
    await asyncio.sleep(2.5)  # the grace ends; the worker's timer drops the old key
    await publish(exchange, "e", "evt-new")
    await eventually(as_async(lambda: "evt-new" in received_ids(receiver, "/b")))
    assert len(signatures(receiver, "/b")) == 1
    assert verify(rotated.body["secret"], receiver, "/b")

    await api_client.call("POST", "/v1/endpoints/c/pause")
    await asyncio.sleep(0.5)
    await publish(exchange, "e", "evt-paused")
    await broker.wait_depth(endpoint_queue(exchange, "c"), 1)
    await asyncio.sleep(0.5)
    assert "evt-paused" not in received_ids(receiver, "/b")
    await api_client.call("POST", "/v1/endpoints/c/resume")
    await eventually(as_async(lambda: "evt-paused" in received_ids(receiver, "/b")))

    with capture_logs() as logs:
        await api_client.call("DELETE", "/v1/endpoints/c")
        await eventually(lambda: was_logged(logs, "endpoint_removed"))


async def test_changes_apply_within_a_second_with_two_workers(
    api_client: ApiClient, run_worker: RunWorker, receiver: Receiver
) -> None:
    """Two workers: after a URL change answered by the API, an event published 1 s later
    goes to the new URL whichever worker takes it (ten changes in a row)."""
    await run_worker(worker_settings(api_client))
    await run_worker(worker_settings(api_client))
    exchange = api_client.server.settings.broker.exchange
    await api_client.call(
        "POST", "/v1/endpoints", {"name": "two", "url": f"{receiver.base_url}/v0", "events": ["e"]}
    )
    for n in range(1, 11):
        answer = await api_client.call(
            "PATCH", "/v1/endpoints/two", {"url": f"{receiver.base_url}/v{n}"}
        )
        assert answer.status == 200
        await asyncio.sleep(1.0)
        await publish(exchange, "e", f"evt-{n}")
        await eventually(as_async(lambda n=n: f"evt-{n}" in received_ids(receiver, f"/v{n}")))


async def test_a_database_outage_never_stops_deliveries(
    api_client: ApiClient, run_worker: RunWorker, receiver: Receiver
) -> None:
    """With the worker's database connection refused: it keeps delivering to the endpoints
    it has, /readyz stays ready and says the registry is unavailable, the metric reads 0;
    a change made meanwhile is applied once the database answers again."""
    upstream = TcpProxy(upstream=("127.0.0.1", 5432))
    await upstream.start()
    try:
        schema = api_client.database_url.rsplit("search_path=", 1)[1]
        proxied = DATABASE_URL.replace("127.0.0.1:5432", f"127.0.0.1:{upstream.port}")
        worker = await run_worker(
            worker_settings(api_client, f"{proxied}?search_path={schema}", connect_timeout_s=1)
        )
        exchange = api_client.server.settings.broker.exchange
        await api_client.call(
            "POST", "/v1/endpoints", {"name": "o", "url": f"{receiver.base_url}/o", "events": ["e"]}
        )
        await eventually(as_async(lambda: "o" in {e.name for e in worker.settings.endpoints}))

        upstream.refusing = True
        upstream.cut()
        await eventually(
            as_async(lambda: worker.registry is not None and not worker.registry.connected)
        )
        assert worker.metrics.registry.get_sample_value("webhook_registry_connected") == 0
        await publish(exchange, "e", "evt-during")
        await eventually(as_async(lambda: "evt-during" in received_ids(receiver, "/o")))
        port = worker.health.port
        async with (
            ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/readyz") as ready,
        ):
            assert ready.status == 200
            detail = await ready.json()
        assert detail["detail"]["registry"]["connected"] is False
        await api_client.call("PATCH", "/v1/endpoints/o", {"url": f"{receiver.base_url}/o2"})

        upstream.refusing = False
        await eventually(
            as_async(lambda: worker.registry is not None and worker.registry.connected), 40
        )
        await eventually(
            as_async(lambda: worker.settings.endpoint("o").url == f"{receiver.base_url}/o2")
        )
        assert worker.metrics.registry.get_sample_value("webhook_registry_connected") == 1
    finally:
        await upstream.close()


async def test_a_worker_started_while_the_database_is_down_uses_its_snapshot(
    api_client: ApiClient, run_worker: RunWorker, receiver: Receiver, tmp_path: Path
) -> None:
    """A worker that kept a snapshot restarts with the database unreachable: it says so,
    and delivers to the snapshot's endpoints (whose secrets it can still open)."""
    snapshot = tmp_path / "registry.json"
    first = await run_worker(worker_settings(api_client, snapshot_path=str(snapshot)))
    created = await api_client.call(
        "POST", "/v1/endpoints", {"name": "s", "url": f"{receiver.base_url}/s", "events": ["e"]}
    )
    await eventually(as_async(lambda: "s" in {e.name for e in first.settings.endpoints}))
    await run_worker.stop(first)
    saved = json.loads(snapshot.read_text())
    assert [row["name"] for row in saved["rows"]] == ["s"]
    assert created.body["secret"] not in snapshot.read_text()
    assert oct(snapshot.stat().st_mode & 0o777) == "0o600"

    unreachable = "postgresql://postgres@127.0.0.1:1/test"
    with capture_logs() as logs:
        second = await run_worker(
            worker_settings(
                api_client, unreachable, snapshot_path=str(snapshot), connect_timeout_s=1
            )
        )
    assert any(entry["event"] == "registry_unavailable_at_start" for entry in logs)
    await publish(api_client.server.settings.broker.exchange, "e", "evt-snap")
    await eventually(as_async(lambda: "evt-snap" in received_ids(receiver, "/s")))
    assert verify(created.body["secret"], receiver, "/s")
    assert second.registry is not None
    assert not second.registry.connected


async def test_a_missed_notification_heals_at_the_next_reconcile(
    api_client: ApiClient, run_worker: RunWorker, receiver: Receiver
) -> None:
    """A change that sent no notification (the trigger off) is picked up by the periodic
    full read."""
    worker = await run_worker(worker_settings(api_client, reconcile_s=1))
    await api_client.call(
        "POST", "/v1/endpoints", {"name": "m", "url": f"{receiver.base_url}/m", "events": ["e"]}
    )
    await eventually(as_async(lambda: "m" in {e.name for e in worker.settings.endpoints}))
    connection = await asyncpg.connect(api_client.database_url)
    try:
        await connection.execute("ALTER TABLE endpoints DISABLE TRIGGER endpoints_changed")
        await connection.execute("UPDATE endpoints SET description = 'quiet' WHERE name = 'm'")
        await connection.execute("ALTER TABLE endpoints ENABLE TRIGGER endpoints_changed")
    finally:
        await connection.close()
    await eventually(
        as_async(lambda: worker.settings.endpoint("m").description == "quiet"), timeout_s=10
    )


async def test_a_row_the_worker_cannot_use_is_skipped_and_the_rest_deliver(
    api_client: ApiClient, run_worker: RunWorker, receiver: Receiver
) -> None:
    """A row whose secret does not open (tampered with) is logged and skipped; the other
    endpoints deliver; a row of the wrong shape stops neither the worker nor its sync."""
    await api_client.call(
        "POST", "/v1/endpoints", {"name": "good", "url": f"{receiver.base_url}/g", "events": ["e"]}
    )
    await api_client.call(
        "POST", "/v1/endpoints", {"name": "bad", "url": f"{receiver.base_url}/b", "events": ["e"]}
    )
    connection = await asyncpg.connect(api_client.database_url)
    try:
        # The good endpoint's sealed secret copied onto the bad one: its name is the
        # associated data, so it does not open there.
        await connection.execute(
            "UPDATE endpoints SET secrets = (SELECT secrets FROM endpoints WHERE name = 'good')"
            " WHERE name = 'bad'"
        )
    finally:
        await connection.close()
    with capture_logs() as logs:
        worker: Worker = await run_worker(worker_settings(api_client))
    assert [e.name for e in worker.settings.endpoints] == ["good"]
    assert any(
        entry["event"] == "registry_endpoint_invalid" and entry["endpoint"] == "bad"
        for entry in logs
    )
    await publish(api_client.server.settings.broker.exchange, "e", "evt-g")
    await eventually(as_async(lambda: "evt-g" in received_ids(receiver, "/g")))
    assert worker.registry is not None
    assert worker.registry.detail()["invalid_endpoints"] == ["bad"]

    # A row of the wrong shape, written by hand while the worker runs, takes that endpoint
    # out (its last version may carry a revoked secret) and stops nothing else.
    connection = await asyncpg.connect(api_client.database_url)
    try:
        await connection.execute(
            """UPDATE endpoints SET secrets = '[{"x": 1}]' WHERE name = 'good'"""
        )
    finally:
        await connection.close()
    await eventually(as_async(lambda: worker.settings.endpoints == ()))
    assert worker.metrics.registry.get_sample_value("webhook_registry_invalid_endpoints") == 2
    created = await api_client.call(
        "POST", "/v1/endpoints", {"name": "later", "url": f"{receiver.base_url}/l", "events": ["e"]}
    )
    assert created.status == 201
    await eventually(as_async(lambda: [e.name for e in worker.settings.endpoints] == ["later"]))
    assert worker.registry.connected
