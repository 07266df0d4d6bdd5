"""``python -m api`` and the worker's one-shot commands with the registry, as operators
run them: real processes, real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import uuid
from pathlib import Path

import asyncpg
from aiohttp import ClientSession
from pydantic import SecretStr

from api import store
from tests.conftest import (
    DATABASE_URL,
    REPO,
    SECRET_KEY,
    ApiClient,
    Broker,
    make_document,
    make_settings,
    registry_sections,
    run_python,
    write_config,
)
from worker.registry import with_registry_endpoints
from worker.signing import SigningKey


def config_for(tmp_path: Path, database_url: str, exchange: str = "hl-cli-unused") -> Path:
    document = make_document(exchange, [], **registry_sections(database_url))
    return write_config(tmp_path, document)


async def test_keys_are_created_listed_and_revoked(registry_db: str, tmp_path: Path) -> None:
    """create-key prints a key once (stdout) and says what it is (stderr); list-keys shows
    ids and scopes, never secrets; revoke-key takes effect at once."""
    config = config_for(tmp_path, registry_db)
    code, out, err = await run_python(
        "-m", "api", "--config", str(config), "create-key", "--tenant", "acme"
    )
    assert code == 0, err
    token = out.strip()
    assert token.startswith("hlk_")
    key_id = token.split("_")[1]
    assert f"key {key_id} (tenant acme)" in err
    code, out, _ = await run_python("-m", "api", "--config", str(config), "list-keys")
    assert code == 0
    assert key_id in out
    assert "tenant=acme" in out
    assert token.split("_", 2)[2] not in out
    connection = await asyncpg.connect(registry_db)
    try:
        assert await store.principal(connection, token) is not None
        code, out, _ = await run_python("-m", "api", "--config", str(config), "revoke-key", key_id)
        assert code == 0
        assert await store.principal(connection, token) is None
    finally:
        await connection.close()
    code, _, err = await run_python("-m", "api", "--config", str(config), "revoke-key", key_id)
    assert code == 1
    assert "no active key" in err


async def test_migrate_reports_and_bad_input_is_refused(registry_db: str, tmp_path: Path) -> None:
    """migrate on an up-to-date schema says so; a bad --tenant and a missing key are exit
    2 with one line, no traceback."""
    config = config_for(tmp_path, registry_db)
    code, out, _ = await run_python("-m", "api", "--config", str(config), "migrate")
    assert (code, out.strip()) == (0, "the schema is up to date")
    code, _, err = await run_python(
        "-m", "api", "--config", str(config), "create-key", "--tenant", "no spaces"
    )
    assert code == 2
    assert "Traceback" not in err
    no_key = make_document("hl-cli-unused", [], **registry_sections(registry_db))
    del no_key["registry"]["secret_key"]
    bare = tmp_path / "bare"
    bare.mkdir()
    code, _, err = await run_python("-m", "api", "--config", str(write_config(bare, no_key)))
    assert code == 2
    assert "HOOKLINE_SECRET_KEY" in err
    assert "Traceback" not in err
    code, out, _ = await run_python("-m", "api", "generate-secret-key")
    assert code == 0
    assert len(out.strip()) == 44


async def test_serving_without_migrations_says_what_to_run(tmp_path: Path) -> None:
    """`python -m api` on a database without the tables exits at once, naming
    `python -m api migrate`."""
    schema = f"hl_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        config = config_for(tmp_path, f"{DATABASE_URL}?search_path={schema}")
        code, _, err = await run_python("-m", "api", "--config", str(config))
        assert code == 1
        assert "python -m api migrate" in err
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def test_the_api_process_serves_and_stops_on_sigterm(
    registry_db: str, exchange_name: str, tmp_path: Path, broker: Broker
) -> None:
    """`python -m api --config ...` answers /readyz, ignores SIGHUP, and SIGTERM ends it
    with exit 0."""
    document = make_document(exchange_name, [], **registry_sections(registry_db))
    document["api"]["port"] = 18473
    config = write_config(tmp_path, document)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "api",
        "--config",
        str(config),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOOKLINE_SECRET_KEY": SECRET_KEY},
    )
    try:
        async with ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get("http://127.0.0.1:18473/readyz") as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the API did not become ready")
            # A SIGHUP meant for the workers does not end the API.
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            async with session.get("http://127.0.0.1:18473/readyz") as answer:
                assert answer.status == 200
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await broker.delete_all(make_settings(exchange_name, [], **registry_sections(registry_db)))


async def test_worker_commands_know_the_registrys_endpoints(
    api_client: ApiClient, tmp_path: Path
) -> None:
    """`python -m worker send-test --endpoint X` works for an endpoint created through the
    API (the one-shot commands read the registry too)."""
    settings = api_client.server.settings
    created = await api_client.call(
        "POST",
        "/v1/endpoints",
        {"name": "via-api", "url": "http://127.0.0.1:9/unused", "events": ["e"]},
    )
    assert created.status == 201
    document = make_document(
        settings.broker.exchange, [], **registry_sections(api_client.database_url)
    )
    config = write_config(tmp_path, document)
    code, out, err = await run_python(
        "-m", "worker", "send-test", "--config", str(config), "--endpoint", "via-api"
    )
    assert "no endpoint named" not in err
    assert code == 1  # port 9 refuses: the attempt was made, to the API's endpoint
    assert "via-api" in out


async def test_reseal_moves_secrets_and_header_values_to_the_first_key(
    api_client: ApiClient, tmp_path: Path
) -> None:
    """After a new key is put in front of HOOKLINE_SECRET_KEY, `reseal` seals every secret
    and header value under it, and the old key can then be dropped."""
    created = await api_client.call(
        "POST",
        "/v1/endpoints",
        {
            "name": "rs",
            "url": "http://127.0.0.1:9/x",
            "events": ["e"],
            "headers": {"Authorization": "Bearer t"},
        },
    )
    assert created.status == 201
    new_key = base64.b64encode(b"n" * 32).decode()
    document = make_document("hl-cli-unused", [], **registry_sections(api_client.database_url))
    document["registry"]["secret_key"] = f"{new_key},{SECRET_KEY}"
    code, out, err = await run_python(
        "-m", "api", "--config", str(write_config(tmp_path, document)), "reseal"
    )
    assert code == 0, err
    assert "of 1 endpoints" in out
    settings = make_settings("hl-cli-unused", [], **registry_sections(api_client.database_url))
    only_new = settings.model_copy(
        update={"registry": settings.registry.model_copy(update={"secret_key": SecretStr(new_key)})}
    )
    loaded = await with_registry_endpoints(only_new)
    endpoint = loaded.endpoint("rs")
    assert endpoint.headers == {"Authorization": "Bearer t"}
    assert endpoint.signing_keys == (SigningKey.parse(created.body["secret"]),)
