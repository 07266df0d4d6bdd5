"""``worker status``: depths, consumers, circuits and dead letters, read from the broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import (
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_document,
    publish_events,
    run_python,
    write_config,
)
from tests.helpers import (
    TERMINAL_ATTACK,
    assert_terminal_safe,
    put_raw_dead_letter,
    strand_in_earlier_tier,
)
from worker.cli_args import tenant as tenant_argument
from worker.exceptions import ManagementUnavailable
from worker.inspect import run_status, worker_circuits
from worker.nodes import LOW_FILE_LIMIT, NodeFiles, read_nodes
from worker.settings import settings_from_document
from worker.topology import dead_letter_queue

# The worker's log lines (structlog's console format): "2026-11-28 10:00:00 [info  ] ..."
LOG_LINE_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


async def status(config: Path, *extra: str) -> tuple[int, str]:
    code, out, err = await run_python("-m", "worker", "status", "--config", str(config), *extra)
    return code, out + err


async def test_status_reports_each_endpoint_from_broker_and_workers(
    tmp_path: Path, exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """One row per endpoint: queued, consumers, circuit (from the worker) and dead letters
    by reason, and the shared retry tiers once; --json gives the same as data."""
    document = make_document(
        exchange_name,
        [
            endpoint("gone", receiver.url("/gone"), ["gone.#"]),
            endpoint("down", receiver.url("/down"), ["down.#"], max_in_flight=1),
        ],
        circuit_breaker={"enabled": True, "failure_threshold": 1, "cooldown_s": 60},
        retry={"delays_s": [30, 60]},
    )
    config = write_config(tmp_path, document)
    receiver.script("/gone", 410)
    receiver.script("/down", 503)
    worker = await run_worker(settings_from_document(document, config, {}))
    await publish_events(exchange_name, 2, "gone.event", "gone")
    await publish_events(exchange_name, 5, "down.event", "down")
    await broker.wait_depth(dead_letter_queue(exchange_name), 2)
    await receiver.wait_for(lambda: len(receiver.on("/down")) == 1)

    async def circuit_open() -> bool:
        listed = {e["name"]: e["circuit"] for e in worker.status()["endpoints"]}
        return listed["down"] == "open"

    await eventually(circuit_open)
    code, out = await status(config, "--json", "--worker", f"http://127.0.0.1:{worker.health.port}")
    assert code == 0, out
    report = json.loads(out)
    gone, down = report["endpoints"]
    assert (gone["name"], gone["queued"], gone["consumers"], gone["circuit"]) == (
        "gone",
        0,
        1,
        "closed",
    )
    assert gone["dead_letters"] == {"no_retry_status": 2}
    assert (down["queued"], down["consumers"], down["circuit"]) == (4, 0, "open 1/1")
    assert report["retry_tiers"] == {"30s": 1, "60s": 0}
    assert (report["dead_letters_read"], report["dead_letters_total"]) == (2, 2)

    code, out = await status(config, "--worker", f"http://127.0.0.1:{worker.health.port}")
    assert code == 0
    assert "gone" in out and "open 1/1" in out and "no_retry_status 2" in out
    assert "tenant" not in out  # no endpoint has one: no column for it
    await broker.wait_depth(dead_letter_queue(exchange_name), 2)


def tenants_document(exchange_name: str, receiver: Receiver) -> dict[str, Any]:
    """Two endpoints of tenant acme (one paused), one of globex, one without a tenant; the
    circuit opens at the first failure."""
    receiver.script("/down", 503)
    return make_document(
        exchange_name,
        [
            endpoint("acme-down", receiver.url("/down"), ["down.#"], tenant="acme"),
            endpoint("acme-idle", receiver.url("/idle"), ["idle.#"], tenant="acme", paused=True),
            endpoint("globex-down", receiver.url("/down"), ["down.#"], tenant="globex"),
            endpoint("plain", receiver.url("/plain"), ["plain.#"]),
        ],
        circuit_breaker={"enabled": True, "failure_threshold": 1, "cooldown_s": 60},
        retry={"delays_s": [60]},
    )


async def test_status_shows_one_tenants_endpoints(
    tmp_path: Path,
    exchange_name: str,
    receiver: Receiver,
    run_worker: RunWorker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a tenant, status lists that tenant's endpoints only, with their circuits from
    the worker, a tenant column and "paused" before a paused endpoint's circuit; without
    one, every endpoint, and the tenant column as soon as one has a tenant."""
    document = tenants_document(exchange_name, receiver)
    settings = settings_from_document(document, write_config(tmp_path, document), {})
    worker = await run_worker(settings)
    await publish_events(exchange_name, 1, "down.event", "down")

    async def circuits_open() -> bool:
        listed = {e["name"]: e["circuit"] for e in worker.status()["endpoints"]}
        return bool(listed["acme-down"] == listed["globex-down"] == "open")

    await eventually(circuits_open)
    url = f"http://127.0.0.1:{worker.health.port}"

    async def run(*, tenant: str | None, as_json: bool) -> str:
        args = argparse.Namespace(
            worker=[url], scan_limit=10_000, management_url=None, json=as_json, tenant=tenant
        )
        capsys.readouterr()
        assert await run_status(settings, args) == 0
        # Without the worker's log lines, which share this process's stdout.
        return "\n".join(
            line for line in capsys.readouterr().out.splitlines() if not LOG_LINE_RE.match(line)
        )

    report = json.loads(await run(tenant="acme", as_json=True))
    assert report["tenant"] == "acme"
    assert [(e["name"], e["tenant"], e["paused"], e["circuit"]) for e in report["endpoints"]] == [
        ("acme-down", "acme", False, "open 1/1"),
        ("acme-idle", "acme", True, "closed"),
    ]

    out = await run(tenant="acme", as_json=False)
    assert "endpoints of tenant acme" in out and "across all tenants" in out
    assert "tenant" in header(out)
    assert "paused, closed" in out and "open 1/1" in out
    assert "globex" not in out and "plain" not in out

    out = await run(tenant=None, as_json=False)
    assert "globex-down" in out and "plain" in out and "tenant" in header(out)
    out = await run(tenant="initech", as_json=False)
    assert "no endpoint has tenant initech" in out and "acme" not in out


def header(table: str) -> str:
    """The status table's row of column names."""
    return next(line for line in table.splitlines() if "queued" in line)


async def test_status_command_takes_a_tenant(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """python -m worker status --tenant T lists T's endpoints only; a value no tenant could
    be is refused with exit 2, before anything is read."""
    document = tenants_document(exchange_name, receiver)
    config = write_config(tmp_path, document)
    try:
        code, out = await status(
            config, "--json", "--worker", "http://127.0.0.1:9", "--tenant", "acme"
        )
        assert code == 0, out
        assert [e["name"] for e in json.loads(out)["endpoints"]] == ["acme-down", "acme-idle"]
        code, out = await status(config, "--tenant", "a b")
        assert code == 2 and "--tenant: must be 1-128" in out
    finally:
        await broker.delete_all(settings_from_document(document, config, {}))


def test_tenant_argument_is_a_tenant_label() -> None:
    """--tenant takes what an endpoint's tenant may be, and nothing else."""
    assert tenant_argument("Acme_1.eu:prod@x-y") == "Acme_1.eu:prod@x-y"
    for bad in ("", "-acme", "a b", "a/b", "a" * 129, "acme\n"):
        with pytest.raises(argparse.ArgumentTypeError):
            tenant_argument(bad)


async def test_status_without_reachable_workers_says_circuit_unknown(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """With no worker answering, the broker's figures are shown and circuits are unknown;
    queues not yet declared show as missing."""
    document = make_document(exchange_name, [endpoint("new", receiver.url("/new"), ["n.#"])])
    config = write_config(tmp_path, document)
    code, out = await status(config, "--json", "--worker", "http://127.0.0.1:9")
    assert code == 0, out
    [row] = json.loads(out)["endpoints"]
    assert (row["queued"], row["consumers"], row["circuit"]) == (None, None, "unknown")
    await broker.delete_all(settings_from_document(document, config, {}))


async def test_status_table_shows_header_text_as_text(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """Dead-letter reasons come from message headers: the status table shows terminal
    controls as visible escapes and rich markup as literal text, never acting on either."""
    document = make_document(exchange_name, [endpoint("a", receiver.url("/a"), ["a.#"])])
    config = write_config(tmp_path, document)
    settings = settings_from_document(document, config, {})
    await broker.declare(settings)
    channel = await broker.channel()
    try:
        await put_raw_dead_letter(
            channel,
            exchange_name,
            b"{}",
            {"hookline-endpoint": "a", "hookline-reason": f"x{TERMINAL_ATTACK}y"},
        )
        code, out = await status(config, "--worker", "http://127.0.0.1:9")
        assert code == 0, out
        assert_terminal_safe(out)
        assert "x\\x1b[2J\\x9b\\u202e[bold red]y 1" in out
        code, out = await status(config, "--json", "--worker", "http://127.0.0.1:9")
        assert code == 0, out
        assert_terminal_safe(out)
        [row] = json.loads(out)["endpoints"]
        assert row["dead_letters"] == {f"x{TERMINAL_ATTACK}y": 1}
    finally:
        await channel.close()
        await broker.delete_all(settings)


async def test_status_shows_delay_tiers_of_an_earlier_schedule(
    tmp_path: Path, exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """After retry.delays_s changed, the tiers of the earlier schedule still hold events
    that will come back: status shows them beside the configured ones."""
    _, after = await strand_in_earlier_tier(broker, run_worker, receiver, exchange_name, 3)
    config = write_config(tmp_path, after)
    code, out = await status(config, "--json", "--worker", "http://127.0.0.1:9")
    assert code == 0, out
    assert json.loads(out)["retry_tiers"] == {"200ms": 0, "60s": 3}


async def test_circuits_of_endpoints_a_worker_does_not_list() -> None:
    """A worker that lists every endpoint it runs does not run the others: they get no
    state from it. One over its 1,000-entry cap has them closed, unless it counts more
    circuits not closed than it listed: then they are unknown. With a tenant, the worker is
    asked for that tenant's endpoints."""
    documents: list[dict[str, Any]] = []
    queries: list[dict[str, str]] = []

    async def status_json(request: web.Request) -> web.Response:
        queries.append(dict(request.query))
        return web.json_response(documents[-1])

    app = web.Application()
    app.router.add_get("/status.json", status_json)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}"
        open_a = [{"name": "a", "circuit": "open"}]
        for total, not_closed, expected in (
            (1, 1, {"a": "open"}),
            (1500, 1, {"a": "open", "b": "closed"}),
            (1500, 2, {"a": "open", "b": "unknown"}),
        ):
            documents.append(
                {"endpoints": open_a, "endpoints_total": total, "circuits_not_closed": not_closed}
            )
            assert await worker_circuits(url, ["a", "b"]) == expected
        assert queries == [{}, {}, {}]
        assert await worker_circuits(url, ["a", "b"], "acme:eu") == {"a": "open", "b": "unknown"}
        assert queries[-1] == {"tenant": "acme:eu"}
    finally:
        await runner.cleanup()


def test_a_low_or_mostly_used_file_limit_is_a_warning() -> None:
    """A node below 4,096 open files wedges silently once a few hundred quorum queues exist;
    one using 80% of its limit is close to it. Neither figure known: no warning."""
    assert NodeFiles("rabbit@a", 100, 1024).warning is not None
    assert NodeFiles("rabbit@a", 16_500, 20_000).warning == "16500 of 20000 open files in use"
    assert NodeFiles("rabbit@a", 600, 20_000).warning is None
    assert NodeFiles("rabbit@a", None, None).warning is None
    assert NodeFiles("rabbit@a", None, None).describe() == "open files not reported yet"


async def test_status_reads_each_nodes_open_files_from_the_management_api(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """With --management-url, status reports every broker node's open files and warns on a
    low limit (this machine's node runs with 20,000, so none); an API that does not answer
    is reported without the password in its URL, and the rest of the report stands."""
    document = make_document(exchange_name, [endpoint("a", receiver.url("/a"), ["a.#"])])
    config = write_config(tmp_path, document)
    async with management_plugin():
        code, out = await status(
            config,
            "--json",
            "--worker",
            "http://127.0.0.1:9",
            "--management-url",
            "http://guest:guest@127.0.0.1:15672",
        )
    assert code == 0, out
    [node] = json.loads(out)["broker_nodes"]
    assert node["fd_total"] >= LOW_FILE_LIMIT and node["fd_used"] > 0
    assert node["warning"] is None
    code, out = await status(
        config,
        "--worker",
        "http://127.0.0.1:9",
        "--management-url",
        "http://guest:s3cret@127.0.0.1:9",
    )
    assert code == 0, out
    assert "broker nodes: not read (http://guest:****@127.0.0.1:9" in out
    assert "s3cret" not in out
    await broker.delete_all(settings_from_document(document, config, {}))


@contextlib.asynccontextmanager
async def management_plugin() -> AsyncIterator[None]:
    """RabbitMQ's management plugin enabled for the block, disabled again after."""
    await rabbitmq_plugins("enable", "rabbitmq_management")
    try:

        async def answers() -> bool:
            try:
                nodes = await read_nodes("http://guest:guest@127.0.0.1:15672")
            except ManagementUnavailable:
                return False
            # The agent reports a node's figures a few seconds after it starts.
            return bool(nodes) and all(node.fd_total is not None for node in nodes)

        await eventually(answers, timeout_s=60)
        yield
    finally:
        await rabbitmq_plugins("disable", "rabbitmq_management", "rabbitmq_management_agent")


async def rabbitmq_plugins(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmq-plugins",
        "-q",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
