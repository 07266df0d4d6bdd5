"""The status page on the metrics port: /status.json, and / rendered in headless Chromium."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    REPO,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_settings,
    publish_events,
)
from worker.service import Worker

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def status_json(worker: Worker) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{worker.health.port}/status.json") as response,
    ):
        assert response.status == 200
        return dict(await response.json())


async def start_showcase(exchange_name: str, receiver: Receiver, run_worker: RunWorker) -> Worker:
    """A worker with one healthy, one failing (circuit open) and one rate-limited endpoint."""
    receiver.script("/billing", 503)
    settings = make_settings(
        exchange_name,
        [
            endpoint("orders", receiver.url("/orders?token=s3cr3t"), ["order.#"]),
            endpoint("billing", receiver.url("/billing"), ["order.#"], max_in_flight=1),
            endpoint("crm", receiver.url("/crm"), ["order.#"], rate_limit_per_s=20),
        ],
        circuit_breaker={"enabled": True, "failure_threshold": 3, "cooldown_s": 120},
        metrics={"queue_poll_s": 0.2},
        retry={"delays_s": [60]},
    )
    worker = await run_worker(settings)
    await publish_events(exchange_name, 120, "order.created", "page")
    await receiver.wait_for(lambda: len(receiver.on("/orders")) == 120)
    return worker


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in document["endpoints"]}


async def test_status_json_shows_states_rates_and_depths_without_urls(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Each endpoint's circuit, recent rates and polled depths, those needing attention
    first, and the worker's totals; destinations are scheme and host only, so tokens in a
    URL's path or query never reach the page."""
    worker = await start_showcase(exchange_name, receiver, run_worker)

    async def polled() -> bool:
        endpoints = by_name(await status_json(worker))
        return endpoints["billing"]["backlog"] == 117 and endpoints["crm"]["backlog"] > 0

    await eventually(polled)
    document = await status_json(worker)
    assert [entry["name"] for entry in document["endpoints"]] == ["billing", "crm", "orders"]
    endpoints = by_name(document)
    orders, billing, crm = endpoints["orders"], endpoints["billing"], endpoints["crm"]
    assert orders["circuit"] == "closed" and orders["delivered_per_s"] > 0
    assert orders["error_ratio"] == 0
    assert "token" not in str(document) and orders["destination"] == receiver.base_url
    assert billing["circuit"] == "open" and billing["error_ratio"] == 1
    assert crm["rate_limit_per_s"] == 20 and crm["backlog"] > 0
    assert "retry_waiting" not in orders  # retries wait in tiers shared by all endpoints
    assert document["ready"] is True and document["dead_letter"] == 0
    assert document["depths_polled_at"] is not None
    assert (document["endpoints_total"], document["endpoints_shown"]) == (3, 3)
    assert document["circuits_not_closed"] == 1
    assert document["delivered_per_s"] >= orders["delivered_per_s"] > 0
    assert document["failed_per_s"] == billing["failed_per_s"] > 0
    assert document["retry_waiting_by_delay"] == {"60s": 3}  # billing's failed attempts
    assert document["retry_waiting"] == 3


@pytest.mark.slow
async def test_status_lists_at_most_1000_endpoints_needing_attention_first(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """With 1,005 endpoints, status.json lists 1,000: the open circuit first, then the
    endpoint with most failures, then the backlog, then by name; the totals still count
    every endpoint."""
    receiver.script("/billing", 503)
    receiver.script("/flaky", 400)
    fillers = [endpoint(f"f{n:04d}", receiver.url("/f"), [f"filler.{n}"]) for n in range(1001)]
    settings = make_settings(
        exchange_name,
        [
            endpoint("orders", receiver.url("/orders"), ["order.#"]),
            endpoint("billing", receiver.url("/billing"), ["order.#"], max_in_flight=1),
            endpoint("flaky", receiver.url("/flaky"), ["order.#"]),
            # Slow enough that its backlog outlasts the poller's turns over 1,005 queues.
            endpoint("crm", receiver.url("/crm"), ["order.#"], rate_limit_per_s=5),
            *fillers,
        ],
        circuit_breaker={"enabled": True, "failure_threshold": 3, "cooldown_s": 120},
        metrics={"queue_poll_s": 0.2},
        retry={"delays_s": [60]},
    )
    worker = await run_worker(settings)
    await publish_events(exchange_name, 120, "order.created", "many")
    await receiver.wait_for(lambda: len(receiver.on("/flaky")) == 120, timeout_s=30)

    async def settled() -> bool:
        document = await status_json(worker)
        names = [entry["name"] for entry in document["endpoints"]]
        return names[:3] == ["billing", "flaky", "crm"] and document["retry_waiting"] == 123

    await eventually(settled, timeout_s=30)
    document = await status_json(worker)
    names = [entry["name"] for entry in document["endpoints"]]
    assert len(names) == document["endpoints_shown"] == 1000
    assert document["endpoints_total"] == 1005
    # Quiet endpoints by name: the last four fillers and orders do not fit.
    assert names[3:] == [f"f{n:04d}" for n in range(997)]
    assert document["circuits_not_closed"] == 1
    assert document["failed_per_s"] > 0 and document["delivered_per_s"] > 0
    assert document["retry_waiting_by_delay"] == {"60s": 123}


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium; CI installs it (.ci/run), elsewhere the test is skipped without it."""
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    return CHROMIUM


async def test_page_renders_offline_in_chromium(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, chromium: str
) -> None:
    """The page loads nothing from anywhere but the worker, shows the totals and every
    endpoint with its circuit state, and refreshes itself; the screenshot in docs/ comes
    from this test."""
    from playwright.async_api import async_playwright

    worker = await start_showcase(exchange_name, receiver, run_worker)
    base = f"http://127.0.0.1:{worker.health.port}"
    requested: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 520})
            page.on("request", lambda request: requested.append(request.url))
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            response = await page.goto(base + "/")
            assert response is not None and response.status == 200
            assert "default-src 'none'" in response.headers["content-security-policy"]
            await page.wait_for_selector("tr[data-endpoint='crm']")
            assert await page.inner_text("tr[data-endpoint='billing'] .badge") == "open"
            assert await page.inner_text("tr[data-endpoint='orders'] .badge") == "closed"
            assert await page.inner_text("#state") == "ready"
            assert await page.inner_text("#endpoints-total") == "3"
            assert await page.inner_text("#circuits-not-closed") == "1"
            refreshed = len([url for url in requested if url.endswith("/status.json")])
            await asyncio.sleep(2.5)
            assert len([url for url in requested if url.endswith("/status.json")]) > refreshed
            await page.wait_for_function(
                "document.querySelector(\"tr[data-endpoint='crm'] td:nth-child(8)\")"
                ".textContent !== '\\u2013'"
            )
            screenshot = await page.screenshot(full_page=True)
            assert errors == []
        finally:
            await browser.close()
    assert requested and all(url.startswith(base) for url in requested)
    assert screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("HOOKLINE_SCREENSHOT"):
        (REPO / "docs" / "status-page.png").write_bytes(screenshot)
