"""Schema migrations on the real PostgreSQL: idempotent, and safe from several processes
at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from api.migrate import migrate, migrations, pending
from tests.conftest import DATABASE_URL


@pytest.fixture
async def empty_schema() -> AsyncIterator[str]:
    """A schema of the test's own with nothing in it; its URL selects it."""
    schema = f"hl_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield f"{DATABASE_URL}?search_path={schema}"
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def test_migrate_applies_everything_once(empty_schema: str) -> None:
    """An empty schema gets every migration; a second run applies nothing."""
    connection = await asyncpg.connect(empty_schema)
    try:
        assert await pending(connection) == [m.name for m in migrations()]
        assert await migrate(connection) == [m.name for m in migrations()]
        assert await migrate(connection) == []
        assert await pending(connection) == []
        tables = {
            row["tablename"]
            for row in await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
        assert {"endpoints", "api_keys", "recoveries", "schema_migrations"} <= tables
    finally:
        await connection.close()


async def test_ten_runners_at_once_apply_each_migration_once(empty_schema: str) -> None:
    """Ten processes' worth of runners started together: the advisory lock lets one
    apply, the others find nothing to do, and nobody fails."""
    connections = [await asyncpg.connect(empty_schema) for _ in range(10)]
    try:
        results = await asyncio.gather(*(migrate(connection) for connection in connections))
    finally:
        for connection in connections:
            await connection.close()
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(m.name for m in migrations())


def test_migrations_are_numbered_in_order() -> None:
    """Files are NNNN_name.sql with distinct, increasing versions starting at 1."""
    versions = [m.version for m in migrations()]
    assert versions == sorted(set(versions))
    assert versions[0] == 1
