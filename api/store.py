"""The registry's tables, as the API reads and writes them (the schema is in
``api/migrations``; workers read it through :mod:`worker.registry`).

Functions take a connection, so that the caller decides the transaction: an endpoint is
written in the same transaction as its queue is declared, and rolled back if the broker
refuses (see :mod:`api.app`).
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

import asyncpg

from api.keys import NewKey, Principal, matches, new_key, split_token
from worker.registry import Row, init_connection
from worker.settings import Settings

# Columns the API writes from a request; the rest are the registry's own.
WRITABLE = (
    "url",
    "events",
    "tenant",
    "filter",
    "headers",
    "timeout_s",
    "max_in_flight",
    "rate_limit_per_s",
    "description",
    "metrics_detail",
    "paused",
)
INSERT_ENDPOINT = (
    "INSERT INTO endpoints (name, url, events, tenant, filter, headers, timeout_s,"
    " max_in_flight, rate_limit_per_s, description, metrics_detail, paused, secrets)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
    " ON CONFLICT (name) DO NOTHING RETURNING *"
)
BUMP = "version = version + 1, updated_at = now()"
MAX_SECRETS = 10
RECOVERY_DEAD_AFTER_S = 60  # the current one and up to nine still in their grace period
# Several API processes each hold a pool: small, since every request is a few queries.
POOL_MAX_SIZE = 10

# A connection of its own or one lent by the pool.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


async def open_pool(settings: Settings) -> asyncpg.Pool:
    assert settings.registry.database_url is not None
    pool = await asyncpg.create_pool(
        settings.registry.database_url.get_secret_value(),
        min_size=1,
        max_size=POOL_MAX_SIZE,
        init=init_connection,
        timeout=settings.registry.connect_timeout_s,
        command_timeout=30,
    )
    assert pool is not None
    return pool


async def principal(connection: Connection, token: str) -> Principal | None:
    parts = split_token(token)
    if parts is None:
        return None
    key_id, secret = parts
    row = await connection.fetchrow(
        "SELECT hash, tenant, admin FROM api_keys WHERE id = $1 AND revoked_at IS NULL", key_id
    )
    if row is None or not matches(secret, row["hash"]):
        return None
    return Principal(key_id=key_id, admin=row["admin"], tenant=row["tenant"])


async def create_key(
    connection: Connection, *, admin: bool, tenant: str | None, description: str | None
) -> NewKey:
    key = new_key()
    await connection.execute(
        "INSERT INTO api_keys (id, hash, tenant, admin, description) VALUES ($1, $2, $3, $4, $5)",
        key.id,
        key.hash,
        tenant,
        admin,
        description,
    )
    return key


async def revoke_key(connection: Connection, key_id: str) -> bool:
    status = await connection.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
    )
    return status.endswith(" 1")


async def list_keys(connection: Connection) -> list[Row]:
    rows = await connection.fetch(
        "SELECT id, tenant, admin, description, created_at, revoked_at FROM api_keys"
        " ORDER BY created_at"
    )
    return [dict(row) for row in rows]


async def get_endpoint(
    connection: Connection, name: str, *, for_update: bool = False
) -> Row | None:
    if for_update:
        row = await connection.fetchrow("SELECT * FROM endpoints WHERE name = $1 FOR UPDATE", name)
    else:
        row = await connection.fetchrow("SELECT * FROM endpoints WHERE name = $1", name)
    return dict(row) if row is not None else None


async def list_endpoints(
    connection: Connection, *, tenant: str | None, after: str | None, limit: int
) -> list[Row]:
    """Ordered by name, after the cursor; only ``tenant``'s if given."""
    rows = await connection.fetch(
        "SELECT * FROM endpoints WHERE ($1::text IS NULL OR tenant = $1)"
        " AND ($2::text IS NULL OR name > $2) ORDER BY name LIMIT $3",
        tenant,
        after,
        limit,
    )
    return [dict(row) for row in rows]


async def lock_tenant(connection: Connection, tenant: str) -> int:
    """Serialise creates for ``tenant`` until the transaction ends (so its endpoint limit
    holds under parallel creates); returns its endpoint count."""
    await connection.execute("SELECT pg_advisory_xact_lock(hashtext('tenant:' || $1))", tenant)
    count = await connection.fetchval("SELECT count(*) FROM endpoints WHERE tenant = $1", tenant)
    return int(count)


async def insert_endpoint(
    connection: Connection, values: dict[str, Any], sealed_secret: str
) -> Row | None:
    """The new row, or None if the name is taken."""
    row = await connection.fetchrow(
        INSERT_ENDPOINT,
        values["name"],
        *(values.get(column) for column in WRITABLE),
        [{"sealed": sealed_secret, "expires_at": None}],
    )
    return dict(row) if row is not None else None


async def update_endpoint(connection: Connection, name: str, changes: dict[str, Any]) -> Row:
    """Apply ``changes`` (columns of :data:`WRITABLE` or ``secrets``), bump the version."""
    unknown = set(changes) - {*WRITABLE, "secrets"}
    if not changes or unknown:
        # Column names go into the statement: never anything but these (not an assert,
        # which python -O removes).
        raise ValueError(f"cannot update {sorted(unknown) or 'nothing'}")
    assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(changes, start=2))
    # Column names checked against WRITABLE above; every value is a parameter.
    statement = f"UPDATE endpoints SET {assignments}, {BUMP} WHERE name = $1 RETURNING *"  # noqa: S608  # nosec B608
    row = await connection.fetchrow(statement, name, *changes.values())
    assert row is not None
    return dict(row)


async def delete_endpoint(connection: Connection, row: Row) -> None:
    """Delete the row and keep its name for its tenant (see ``deleted_names``)."""
    await connection.execute("DELETE FROM endpoints WHERE name = $1", row["name"])
    await connection.execute(
        "INSERT INTO deleted_names (name, tenant, recover_after) VALUES ($1, $2, $3)"
        " ON CONFLICT (name) DO UPDATE SET tenant = EXCLUDED.tenant,"
        " recover_after = EXCLUDED.recover_after, deleted_at = now()",
        row["name"],
        row["tenant"],
        row["recover_after"],
    )


async def deleted_name(connection: Connection, name: str) -> Row | None:
    """What a deleted endpoint of this name left: its tenant and recover_after."""
    row = await connection.fetchrow(
        "SELECT tenant, recover_after FROM deleted_names WHERE name = $1", name
    )
    return dict(row) if row is not None else None


async def lock_name(connection: Connection, name: str) -> None:
    """Serialise every create and delete of ``name`` until the transaction ends: a create
    must not read ``deleted_names`` while the name's delete is still uncommitted."""
    await connection.execute("SELECT pg_advisory_xact_lock(hashtext('name:' || $1))", name)


async def take_name(connection: Connection, name: str, *, keep_history: Row | None) -> datetime:
    """Give a deleted name to its new endpoint. With ``keep_history`` (the deleted row of
    the same tenant), recoveries reach back to that endpoint's creation; otherwise to
    now. Returns the new ``recover_after``."""
    await connection.execute("DELETE FROM deleted_names WHERE name = $1", name)
    recover_after: datetime = await connection.fetchval(
        "UPDATE endpoints SET recover_after = coalesce($2, recover_after) WHERE name = $1"
        " RETURNING recover_after",
        name,
        keep_history["recover_after"] if keep_history is not None else None,
    )
    return recover_after


def rotated_secrets(
    current: list[dict[str, Any]], sealed: str, *, now: float, grace_s: float
) -> list[dict[str, Any]]:
    """The new secret first; the ones signing now keep signing until ``now + grace_s``
    (or their own earlier end), at most :data:`MAX_SECRETS` in all."""
    ends = now + grace_s
    kept = []
    for entry in current:
        expires_at = entry.get("expires_at")
        if expires_at is not None and expires_at <= now:
            continue
        if grace_s <= 0:
            continue
        kept.append({**entry, "expires_at": ends if expires_at is None else min(expires_at, ends)})
    return [{"sealed": sealed, "expires_at": None}, *kept][:MAX_SECRETS]


async def insert_recovery(
    connection: Connection,
    *,
    endpoint: str,
    tenant: str | None,
    since: datetime,
    until: datetime | None,
    rate_per_s: float | None,
) -> Row | None:
    """A new running recovery, or None while the tenant has one running already (one
    whose heartbeat stopped does not count: its API process is gone)."""
    await connection.execute(
        "SELECT pg_advisory_xact_lock(hashtext('recovery:' || coalesce($1, '')))", tenant
    )
    running = await connection.fetchval(
        "SELECT count(*) FROM recoveries WHERE status = 'running'"
        " AND tenant IS NOT DISTINCT FROM $1 AND heartbeat_at > now() - make_interval(secs => $2)",
        tenant,
        float(RECOVERY_DEAD_AFTER_S),
    )
    if running:
        return None
    row = await connection.fetchrow(
        "INSERT INTO recoveries (id, endpoint, tenant, since, until, rate_per_s, status)"
        " VALUES ($1, $2, $3, $4, $5, $6, 'running') RETURNING *",
        f"rcv_{secrets.token_hex(8)}",
        endpoint,
        tenant,
        since,
        until,
        rate_per_s,
    )
    assert row is not None
    return dict(row)


async def finish_recovery(
    connection: Connection, recovery_id: str, *, replayed: int, error: str | None
) -> None:
    await connection.execute(
        "UPDATE recoveries SET status = $2, replayed = $3, error = $4, finished_at = now()"
        " WHERE id = $1",
        recovery_id,
        "failed" if error is not None else "finished",
        replayed,
        error,
    )


async def count_recovered(connection: Connection, recovery_id: str, replayed: int) -> None:
    await connection.execute(
        "UPDATE recoveries SET replayed = $2, heartbeat_at = now() WHERE id = $1",
        recovery_id,
        replayed,
    )


async def get_recovery(connection: Connection, recovery_id: str) -> Row | None:
    row = await connection.fetchrow("SELECT * FROM recoveries WHERE id = $1", recovery_id)
    return dict(row) if row is not None else None
