"""``make demo`` (examples/demo.py), one of README's two commands, runs end to end: the
RabbitMQ part, and the control plane on the test PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import sys

import aiormq
import asyncpg
import pytest

from examples.demo import API_ENDPOINT
from tests.conftest import DATABASE_URL, REPO, Broker
from worker.settings import load_settings
from worker.topology import endpoint_queue

SCHEMA_RE = re.compile(r"created schema (hookline_demo_[0-9a-f]+)")
# A signing secret or an API key printed whole (config.yaml's demo secrets are never printed).
SECRET_RE = re.compile(r"whsec_[A-Za-z0-9+/=]{16,}|hlk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}")


async def queue_exists(broker: Broker, name: str) -> bool:
    channel = await broker.channel()
    try:
        await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


async def schema_exists(schema: str) -> bool:
    connection = await asyncpg.connect(DATABASE_URL)
    try:
        found = await connection.fetchval(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema
        )
    finally:
        await connection.close()
    return bool(found)


@pytest.mark.slow
async def test_demo_delivers_dead_letters_drives_the_api_and_stops_cleanly(broker: Broker) -> None:
    """The demo's events arrive verified, flaky's ends in the dead-letter queue and raises
    an operational event, the ping answers. Then the control plane: the schema is
    migrated, the API creates an endpoint that the running worker picks up live, and the
    receiver verifies its event with the secret the API returned; a paused endpoint holds
    its event in its queue until resumed; after a rotation a receiver with only the new
    secret verifies; the endpoint is deleted. The worker and the API exit 0, and neither the
    demo's schema nor the endpoint's queue is left behind, nor a secret or key printed."""
    settings = load_settings(REPO / "config.yaml")
    api_queue = endpoint_queue(settings.broker.exchange, API_ENDPOINT)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "examples/demo.py",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=180)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = out.decode()
    try:
        check_demo_output(text, process.returncode)
        schema = SCHEMA_RE.search(text)
        assert schema is not None
        assert not await schema_exists(schema.group(1))
        assert not await queue_exists(broker, api_queue)
    finally:
        await broker.delete_all(settings)
        channel = await broker.channel()
        await channel.queue_delete(api_queue)
        await channel.close()
        schema = SCHEMA_RE.search(text)
        if schema is not None:
            connection = await asyncpg.connect(DATABASE_URL)
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema.group(1)}" CASCADE')
            await connection.close()


def check_demo_output(text: str, returncode: int | None) -> None:
    assert returncode == 0, text
    assert "attempts_exhausted" in text and "1 dead letter" in text
    assert "hookline.event.dead_lettered" in text
    assert "orders: HTTP 2" in text
    assert "worker exit code 0" in text

    # The control plane.
    schema = SCHEMA_RE.search(text)
    assert schema is not None, text
    assert "applied: 0001_registry.sql" in text
    assert "HTTP/1.1 201 Created" in text and f"Location: /v1/endpoints/{API_ENDPOINT}" in text
    assert f"config_reloaded source=registry added={API_ENDPOINT}" in text
    verified = re.findall(
        rf"receiver:\d+ +\| signature verified  /webhooks/{API_ENDPOINT}  (\S+)", text
    )
    assert verified == ["customer.created", "customer.updated", "customer.deleted"]
    assert "RabbitMQ holds 1 in its queue" in text
    paused = text.index('"paused": true')
    assert text.index("customer.updated  evt_", paused) > text.index('"paused": false')
    assert '"previous_secret_expires_at": "' in text
    assert f"config_reloaded source=registry removed={API_ENDPOINT}" in text
    assert "api exit code 0" in text
    assert f"dropped schema {schema.group(1)}" in text
    assert SECRET_RE.findall(text) == []
