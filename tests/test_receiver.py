"""The example receiver verifies signatures, refuses stale or forged requests and dedupes."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from examples.receiver.app import build_app
from tests.conftest import SECRET_A, SECRET_B
from worker.signing import SigningKey, signature_header

BODY = b'{"id":"evt-r1","type":"a.b","timestamp":"2026-01-01T00:00:00Z","data":{"k":1}}'


async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    app = build_app({"/hook": SECRET_A}, failing_paths=frozenset({"/down"}), quiet=True)
    async for url in serve(app):
        yield url


def signed(secret: str, event_id: str = "evt-r1", at: int | None = None) -> dict[str, str]:
    at = int(time.time()) if at is None else at
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(at),
        "webhook-signature": signature_header([SigningKey.parse(secret)], event_id, at, BODY),
    }


async def post(url: str, headers: dict[str, str]) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=BODY, headers=headers) as r,
    ):
        return r.status, await r.text()


async def test_valid_request_is_accepted_once(base_url: str) -> None:
    """A correctly signed request gets 204; the same webhook-id again is a 200 duplicate."""
    assert (await post(f"{base_url}/hook", signed(SECRET_A)))[0] == 204
    status, text = await post(f"{base_url}/hook", signed(SECRET_A))
    assert (status, "duplicate" in text) == (200, True)


async def test_forged_stale_and_unsigned_requests_are_refused(base_url: str) -> None:
    """A wrong secret, a timestamp 10 minutes old, or missing headers get 401."""
    assert (await post(f"{base_url}/hook", signed(SECRET_B, "evt-f1")))[0] == 401
    stale = signed(SECRET_A, "evt-f2", at=int(time.time()) - 600)
    assert (await post(f"{base_url}/hook", stale))[0] == 401
    assert (await post(f"{base_url}/hook", {"content-type": "application/json"}))[0] == 401


async def test_failing_path_and_unknown_path(base_url: str) -> None:
    """The demo's failing path answers 503; an unknown path 404."""
    assert (await post(f"{base_url}/down", signed(SECRET_A)))[0] == 503
    assert (await post(f"{base_url}/other", signed(SECRET_A)))[0] == 404


async def test_ip_allowlist_refuses_other_senders() -> None:
    """With an allowlist that excludes loopback, requests from 127.0.0.1 get 403."""
    networks = (ipaddress.ip_network("203.0.113.0/24"),)
    app = build_app({"/hook": SECRET_A}, allowed_networks=networks, quiet=True)
    async for url in serve(app):
        assert (await post(f"{url}/hook", signed(SECRET_A)))[0] == 403
