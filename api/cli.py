"""``python -m api``: the registry API and its operator commands.

python -m api --config config.yaml              serve the API (api.host:api.port)
python -m api --config config.yaml migrate      create or update the tables
python -m api --config config.yaml create-key --admin | --tenant T
python -m api --config config.yaml list-keys | revoke-key ID
python -m api --config config.yaml reseal       seal every secret with the first key
python -m api generate-secret-key               a value for HOOKLINE_SECRET_KEY
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg
import structlog

from api import store
from api.migrate import migrate
from api.server import ApiServer
from producer.exceptions import error_lines
from worker.cli import EXIT_BAD_INPUT, EXIT_FAILED, run_async
from worker.exceptions import ConfigError, HooklineError
from worker.logs import configure_logging
from worker.registry import DATABASE_FAILURES, connect, header_context, open_headers
from worker.secretbox import SecretBox, generate_key
from worker.settings import TENANT_RE, Settings, load_settings

log = structlog.get_logger("hookline.api")
COMMANDS = ("serve", "migrate", "create-key", "list-keys", "revoke-key", "reseal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m api",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the API (the default)")
    commands.add_parser("migrate", help="apply the schema migrations (safe to run concurrently)")
    create = commands.add_parser("create-key", help="print a new API key (shown once)")
    scope = create.add_mutually_exclusive_group(required=True)
    scope.add_argument("--admin", action="store_true", help="every tenant's endpoints")
    scope.add_argument("--tenant", help="this tenant's endpoints only")
    create.add_argument("--description", help="what the key is for")
    commands.add_parser("list-keys", help="keys (never their secrets)")
    revoke = commands.add_parser("revoke-key", help="revoke a key at once")
    revoke.add_argument("key_id")
    commands.add_parser("reseal", help="seal every endpoint secret with the first key")
    commands.add_parser("generate-secret-key", help="print a new HOOKLINE_SECRET_KEY value")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    if command == "generate-secret-key":
        print(generate_key())
        return 0
    if command == "create-key" and args.tenant is not None and not TENANT_RE.fullmatch(args.tenant):
        print("error: --tenant must be 1-128 of [A-Za-z0-9_.:@-]", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        settings = load_settings(args.config)
        if not settings.registry.enabled:
            raise ConfigError(
                f"{args.config}: registry.database_url (or HOOKLINE_DATABASE_URL) is not set"
            )
        if command in ("serve", "reseal"):
            SecretBox.from_setting(settings.registry.secret_key)
    except ConfigError as exc:
        print(error_lines(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    configure_logging(settings.worker)
    if command == "serve":
        return run_async(serve(settings))
    runs: dict[str, Callable[[asyncpg.Connection], Awaitable[int]]] = {
        "migrate": _migrate,
        "create-key": lambda connection: _create_key(connection, args),
        "list-keys": _list_keys,
        "revoke-key": lambda connection: _revoke_key(connection, args.key_id),
        "reseal": lambda connection: _reseal(connection, settings),
    }
    return run_async(_with_connection(settings, runs[command]))


async def serve(settings: Settings) -> int:
    try:
        server = ApiServer(settings)
    except ConfigError as exc:
        print(error_lines(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop)
    # The worker reloads on SIGHUP; the API reads its config at start only, and a SIGHUP
    # sent to every Hookline process must not end it.
    loop.add_signal_handler(signal.SIGHUP, _ignore_hangup)
    try:
        await server.run()
    except HooklineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _ignore_hangup() -> None:
    log.warning("api_reload_unsupported", hint="restart the API to apply config changes")


async def _with_connection(
    settings: Settings, run: Callable[[asyncpg.Connection], Awaitable[int]]
) -> int:
    try:
        connection = await connect(settings)
    except HooklineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return await run(connection)
    except DATABASE_FAILURES as exc:
        print(f"error: the registry database failed: {exc.__class__.__name__}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await connection.close()


async def _migrate(connection: asyncpg.Connection) -> int:
    applied = await migrate(connection)
    print(f"applied: {', '.join(applied)}" if applied else "the schema is up to date")
    return 0


async def _create_key(connection: asyncpg.Connection, args: argparse.Namespace) -> int:
    key = await store.create_key(
        connection, admin=args.admin, tenant=args.tenant, description=args.description
    )
    scope = "admin" if args.admin else f"tenant {args.tenant}"
    print(key.token)
    print(f"key {key.id} ({scope}); shown once: store it now", file=sys.stderr)
    return 0


async def _list_keys(connection: asyncpg.Connection) -> int:
    for row in await store.list_keys(connection):
        scope = "admin" if row["admin"] else f"tenant={row['tenant']}"
        state = f"revoked {row['revoked_at']:%Y-%m-%d}" if row["revoked_at"] else "active"
        print(f"{row['id']}  {scope}  {state}  {row['description'] or ''}".rstrip())
    return 0


async def _revoke_key(connection: asyncpg.Connection, key_id: str) -> int:
    if await store.revoke_key(connection, key_id):
        print(f"key {key_id} revoked")
        return 0
    print(f"error: no active key {key_id!r}", file=sys.stderr)
    return EXIT_FAILED


async def _reseal(connection: asyncpg.Connection, settings: Settings) -> int:
    """Seal every secret and header value again under the first key (after adding a new
    key in front of HOOKLINE_SECRET_KEY); secrets past their grace are dropped."""
    box = SecretBox.from_setting(settings.registry.secret_key)
    resealed = 0
    now = time.time()
    async with connection.transaction():
        rows = await connection.fetch("SELECT name, secrets, headers FROM endpoints FOR UPDATE")
        for row in rows:
            name, entries, headers = row["name"], row["secrets"], row["headers"] or {}
            stale = any(box.needs_reseal(entry["sealed"]) for entry in entries) or any(
                box.needs_reseal(value) for value in headers.values()
            )
            if not stale:
                continue
            fresh_secrets = [
                {**entry, "sealed": box.seal(box.open(entry["sealed"], name), name)}
                for entry in entries
                if entry.get("expires_at") is None or entry["expires_at"] > now
            ]
            fresh_headers = {
                header: box.seal(value, header_context(name, header))
                for header, value in open_headers(box, name, headers).items()
            }
            await store.update_endpoint(
                connection, name, {"secrets": fresh_secrets, "headers": fresh_headers}
            )
            resealed += 1
    print(f"resealed the secrets and header values of {resealed} endpoints")
    return 0
