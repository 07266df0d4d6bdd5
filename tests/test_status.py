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


async def status_json(worker: Worker, query: str = "", expect: int = 200) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{worker.health.port}/status.json{query}") as response,
    ):
        assert response.status == expect
        assert response.headers["Cache-Control"] == "no-store"
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


async def start_tenants(exchange_name: str, receiver: Receiver, run_worker: RunWorker) -> Worker:
    """A worker with two endpoints of tenant acme (one paused), one of globex and one
    without a tenant."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("acme-orders", receiver.url("/a?token=s3cr3t"), ["order.#"], tenant="acme"),
            endpoint("acme-crm", receiver.url("/c"), ["crm.#"], tenant="acme", paused=True),
            endpoint("globex", receiver.url("/g"), ["order.#"], tenant="globex"),
            endpoint("plain", receiver.url("/p"), ["order.#"]),
        ],
    )
    return await run_worker(settings)


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
    assert document["tenant"] is None and document["endpoints_paused"] == 0
    assert orders["tenant"] is None and orders["paused"] is False


async def test_status_json_lists_one_tenants_endpoints(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Every endpoint shows its tenant (null without one) and whether it is paused;
    ?tenant=T keeps T's endpoints only, with totals of those; an empty value is no filter;
    a value no endpoint could carry, or two values, is a 400 with a JSON error."""
    worker = await start_tenants(exchange_name, receiver, run_worker)
    document = await status_json(worker)
    endpoints = by_name(document)
    assert {name: (e["tenant"], e["paused"]) for name, e in endpoints.items()} == {
        "acme-orders": ("acme", False),
        "acme-crm": ("acme", True),
        "globex": ("globex", False),
        "plain": (None, False),
    }
    assert endpoints["acme-crm"]["circuit"] == "closed"  # paused is not a circuit state
    assert (document["tenant"], document["endpoints_total"], document["endpoints_paused"]) == (
        None,
        4,
        1,
    )
    assert "s3cr3t" not in str(document)

    acme = await status_json(worker, "?tenant=acme")
    assert sorted(by_name(acme)) == ["acme-crm", "acme-orders"]
    assert (acme["tenant"], acme["endpoints_total"], acme["endpoints_shown"]) == ("acme", 2, 2)
    assert (acme["endpoints_paused"], acme["circuits_not_closed"]) == (1, 0)
    assert acme["dead_letter"] == document["dead_letter"]  # the exchange's, not acme's

    # Every character a tenant may have, quoted as a browser does: one tenant, not two.
    nobody = await status_json(worker, "?tenant=Nobody_1.x%3Ay%40z-")
    assert (nobody["tenant"], nobody["endpoints"], nobody["endpoints_total"]) == (
        "Nobody_1.x:y@z-",
        [],
        0,
    )
    assert len((await status_json(worker, "?tenant="))["endpoints"]) == 4
    for query in ("?tenant=a%20b", "?tenant=-acme", "?tenant=" + "a" * 129, "?tenant=a&tenant=b"):
        refused = await status_json(worker, query, expect=400)
        assert set(refused) == {"error"} and "tenant" in refused["error"], query


@pytest.mark.slow
async def test_status_lists_at_most_1000_endpoints_needing_attention_first(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """With 1,005 endpoints, status.json lists 1,000: the open circuit first, then the
    endpoint with most failures, then the backlog, then by name; the totals still count
    every endpoint. With ?tenant=T, the 1,000 are of T's endpoints alone."""
    receiver.script("/billing", 503)
    receiver.script("/flaky", 400)
    fillers = [
        endpoint(f"f{n:04d}", receiver.url("/f"), [f"filler.{n}"], tenant="bulk")
        for n in range(1001)
    ]
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
    # The filter first, then the cap: none of the endpoints above is bulk's.
    bulk = await status_json(worker, "?tenant=bulk")
    assert [entry["name"] for entry in bulk["endpoints"]] == [f"f{n:04d}" for n in range(1000)]
    assert (bulk["endpoints_total"], bulk["endpoints_shown"]) == (1001, 1000)
    assert (bulk["circuits_not_closed"], bulk["failed_per_s"]) == (0, 0)


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
    from playwright.async_api import async_playwright, expect

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
            assert await page.inner_text("tr[data-endpoint='billing'] .circuit") == "open"
            assert await page.inner_text("tr[data-endpoint='orders'] .circuit") == "closed"
            # No endpoint has a tenant: no tenant column, no paused badge.
            assert not await page.is_visible("th.tenant")
            assert await page.query_selector(".badge.paused") is None
            assert await page.inner_text("#state") == "ready"
            assert await page.inner_text("#endpoints-total") == "3"
            assert await page.inner_text("#circuits-not-closed") == "1"
            refreshed = len([url for url in requested if url.endswith("/status.json")])
            await asyncio.sleep(2.5)
            assert len([url for url in requested if url.endswith("/status.json")]) > refreshed
            # The queue depth once polled. Waited for through the protocol: the page's CSP
            # forbids the eval that wait_for_function polls with, once its first try fails.
            await expect(page.locator("tr[data-endpoint='crm'] td:nth-child(9)")).not_to_have_text(
                "\u2013"
            )
            screenshot = await page.screenshot(full_page=True)
            assert errors == []
        finally:
            await browser.close()
    assert requested and all(url.startswith(base) for url in requested)
    assert screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("HOOKLINE_SCREENSHOT"):
        (REPO / "docs" / "status-page.png").write_bytes(screenshot)


async def test_page_filters_by_tenant_in_chromium(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, chromium: str
) -> None:
    """The page opened with ?tenant= fetches and shows that tenant's endpoints only, a
    paused one with its badge; typing another tenant re-fetches and puts it in the page's
    address (a link to share); a value no tenant could be shows the worker's error as text;
    an empty filter shows every endpoint, and a tenant in the table filters to it."""
    from playwright.async_api import async_playwright, expect

    worker = await start_tenants(exchange_name, receiver, run_worker)
    base = f"http://127.0.0.1:{worker.health.port}"
    requested: list[str] = []

    def rows(page: Any) -> Any:
        return page.eval_on_selector_all(
            "#endpoints tr", "rows => rows.map(r => r.dataset.endpoint)"
        )

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(base + "/?tenant=acme")
            await page.wait_for_selector("tr[data-endpoint='acme-crm']")
            assert sorted(await rows(page)) == ["acme-crm", "acme-orders"]
            assert await page.input_value("#tenant") == "acme"
            assert f"{base}/status.json?tenant=acme" in requested
            assert await page.inner_text("#endpoints-total") == "2"
            assert await page.inner_text("#endpoints-paused") == "1 paused"
            assert await page.inner_text("tr[data-endpoint='acme-crm'] .paused") == "paused"
            assert await page.inner_text("tr[data-endpoint='acme-crm'] .circuit") == "closed"
            assert await page.query_selector("tr[data-endpoint='acme-orders'] .paused") is None
            assert await page.is_visible("th.tenant")
            assert await page.inner_text("tr[data-endpoint='acme-orders'] td.tenant") == "acme"

            await page.fill("#tenant", "globex")
            await page.wait_for_selector("tr[data-endpoint='globex']")
            assert await rows(page) == ["globex"]
            assert page.url == base + "/?tenant=globex"
            assert await page.inner_text("#endpoints-total") == "1"

            await page.fill("#tenant", "<b>x</b>")
            await expect(page.locator("#filter-error")).to_contain_text("tenant must be")
            assert await rows(page) == [] and await page.query_selector("b:text-is('x')") is None
            assert page.url == base + "/?tenant=%3Cb%3Ex%3C%2Fb%3E"

            await page.fill("#tenant", "")
            await page.wait_for_selector("tr[data-endpoint='plain']")
            assert sorted(await rows(page)) == ["acme-crm", "acme-orders", "globex", "plain"]
            assert page.url == base + "/"
            assert await page.inner_text("#filter-error") == ""
            assert await page.inner_text("tr[data-endpoint='plain'] td.tenant") == "\u2013"

            await page.click("tr[data-endpoint='globex'] td.tenant a")
            await page.wait_for_selector("tr[data-endpoint='plain']", state="detached")
            assert await rows(page) == ["globex"]
            assert await page.input_value("#tenant") == "globex"
            assert page.url == base + "/?tenant=globex"
            assert errors == []
        finally:
            await browser.close()
    assert all(url.startswith(base) for url in requested)
