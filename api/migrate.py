"""Schema migrations: ``python -m api migrate``.

Each file in ``api/migrations`` (``NNNN_name.sql``) is applied once, in order, in a
transaction of its own, and recorded in ``schema_migrations``. The runner holds a
PostgreSQL advisory lock while it works, so several processes may run it at once (every
API replica at start-up, say): one applies, the others wait and then find nothing to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import structlog

from api.store import Connection
from worker.exceptions import HooklineError
from worker.registry import channel_name

# Any constant shared by every runner; "hookline" in ASCII.
ADVISORY_LOCK_ID = 0x686F6F6B6C696E65
MAX_IDENTIFIER_BYTES = 63
MIGRATION_FILE_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

log = structlog.get_logger("hookline.api")


class MigrationError(HooklineError):
    """The database cannot take the schema as it is set up."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("api").joinpath("migrations").iterdir():
        match = MIGRATION_FILE_RE.match(entry.name)
        if match is not None:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    if len({migration.version for migration in found}) != len(found):
        raise RuntimeError("two migrations share a version number")
    return found


async def migrate(connection: Connection) -> list[str]:
    """Apply what is missing; returns the names applied (none when up to date)."""
    applied: list[str] = []
    schema = await connection.fetchval("SELECT current_schema()")
    if schema is None:
        raise MigrationError("no schema: the search_path names none that exists")
    if len(channel_name(schema).encode()) > MAX_IDENTIFIER_BYTES:
        raise MigrationError(
            f"schema name {schema[:80]!r} is too long: the notification channel "
            f"{channel_name(schema)!r} must fit PostgreSQL's {MAX_IDENTIFIER_BYTES} bytes"
        )
    await connection.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_ID)
    try:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM schema_migrations")
        }
        for migration in migrations():
            if migration.version in done:
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied.append(migration.name)
            log.info("migration_applied", migration=migration.name)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_ID)
    return applied


async def pending(connection: Connection) -> list[str]:
    """Migrations not applied yet (all of them on an empty database)."""
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done: set[int] = set()
    if exists:
        done = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM schema_migrations")
        }
    return [migration.name for migration in migrations() if migration.version not in done]
