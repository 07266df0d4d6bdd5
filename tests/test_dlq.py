"""dlq list/replay/purge against a real dead-letter queue filled by a real worker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pty
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import given, settings
from hypothesis import strategies as st

from producer import Publisher
from producer.envelope import build_body
from tests.conftest import (
    AMQP_URL,
    REPO,
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_document,
    make_settings,
    publish_events,
    run_python,
    write_config,
)
from tests.helpers import (
    TERMINAL_ATTACK,
    amqp_field_values,
    assert_terminal_safe,
    peek_all,
    put_raw_dead_letter,
    queue_policy,
    strand_in_legacy_tier,
)
from worker import dlq
from worker.scan import REFRESH_AT_DELIVERY_COUNT
from worker.settings import RetrySettings, Settings
from worker.topology import (
    dead_letter_overflow_queue,
    dead_letter_queue,
    endpoint_queue,
    inspect_queue,
)


@dataclass
class Filled:
    settings: Settings
    ids: list[str]


@pytest.fixture
async def filled(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> Filled:
    """A running worker, and 3 dead letters of endpoint 'a' and 2 of 'b' (both answer 410)."""
    settings = make_settings(
        exchange_name,
        [
            endpoint("a", receiver.url("/a"), ["to.a"]),
            endpoint("b", receiver.url("/b"), ["to.b"]),
        ],
    )
    await run_worker(settings)
    receiver.script("/a", 410)
    receiver.script("/b", 410)
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        ids = [await publisher.publish("to.a", {"i": i}) for i in range(3)]
        ids += [await publisher.publish("to.b", {"i": i}) for i in range(2)]
    await broker.wait_depth(dead_letter_queue(exchange_name), 5, timeout_s=15)
    return Filled(settings, ids)


async def test_list_shows_fields_and_filters_without_consuming(
    filled: Filled, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """list shows id, type, endpoint, reason, attempts, last status, time; it removes nothing."""
    settings = filled.settings
    ids = filled.ids
    letters = await dlq.list_dead_letters(settings)
    assert sorted(letter.event_id for letter in letters) == sorted(ids)
    first = next(letter for letter in letters if letter.endpoint == "a")
    assert (first.event_type, first.reason, first.attempts, first.last_status) == (
        "to.a",
        "no_retry_status",
        1,
        "410",
    )
    assert first.dead_lettered_at.startswith("20")
    assert len(await dlq.list_dead_letters(settings, dlq.Selection(endpoint="b"))) == 2
    assert len(await dlq.list_dead_letters(settings, dlq.Selection(limit=2))) == 2
    await broker.wait_depth(dead_letter_queue(exchange_name), 5)


async def test_replay_redelivers_with_fresh_attempts(
    filled: Filled, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """replay sends an endpoint's dead letters back to it as attempt 1 and removes them."""
    settings = filled.settings
    receiver.script("/a", 200)
    report = await dlq.replay(settings, dlq.Selection(endpoint="a", limit=2))
    assert len(report.replayed) == 2
    await receiver.wait_for(lambda: len(receiver.on("/a")) == 5)
    await asyncio.sleep(0.3)
    await broker.wait_depth(dead_letter_queue(exchange_name), 3)
    remaining = await dlq.list_dead_letters(settings)
    assert sorted(letter.endpoint for letter in remaining) == ["a", "b", "b"]


async def test_replay_leaves_letters_of_unknown_endpoints(
    filled: Filled, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """Dead letters of an endpoint no longer configured stay in the queue."""
    only_a = make_settings(exchange_name, [endpoint("a", receiver.url("/a"), ["to.a"])])
    receiver.script("/a", 200)
    report = await dlq.replay(only_a)
    assert (len(report.replayed), report.skipped_unknown_endpoint) == (3, 2)
    await broker.wait_depth(dead_letter_queue(exchange_name), 2)


async def test_purge_by_endpoint_and_all(
    filled: Filled, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """purge removes one endpoint's dead letters, or all of them."""
    settings = filled.settings
    assert await dlq.purge(settings, dlq.Selection(endpoint="b")) == 2
    await broker.wait_depth(dead_letter_queue(exchange_name), 3)
    assert await dlq.purge(settings) == 3
    await broker.wait_depth(dead_letter_queue(exchange_name), 0)


async def put_dead_letters(
    broker: Broker,
    exchange: str,
    count: int,
    *,
    endpoint_name: str = "a",
    reason: str = "attempts_exhausted",
    event_type: str = "to.a",
    dead_lettered_at: str | None = None,
    prefix: str = "dl",
) -> list[str]:
    """Dead letters as a worker writes them, published straight into the queue (fast)."""
    moment = dead_lettered_at or datetime.now(UTC).isoformat(timespec="seconds")
    channel = await broker.channel()
    try:
        ids = []
        for n in range(count):
            event_id, body = build_body(event_type, {"n": n}, event_id=f"{prefix}-{n}")
            headers = {
                "hookline-endpoint": endpoint_name,
                "hookline-reason": reason,
                "hookline-attempts": 3,
                "hookline-last-status": "503",
                "hookline-dead-lettered-at": moment,
                "hookline-detail": "test",
            }
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    message_id=event_id,
                    headers=headers,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                dead_letter_queue(exchange),
            )
            ids.append(event_id)
        return ids
    finally:
        await channel.close()


@pytest.fixture
async def declared(
    exchange_name: str, receiver: Receiver, broker: Broker
) -> AsyncIterator[Settings]:
    """Endpoints a and b declared on the broker, no worker running; deleted afterwards."""
    settings = make_settings(
        exchange_name,
        [endpoint("a", receiver.url("/a"), ["to.a"]), endpoint("b", receiver.url("/b"), ["to.b"])],
    )
    await broker.declare(settings)
    try:
        yield settings
    finally:
        await broker.delete_all(settings)


async def run_cli(settings: Settings, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    config = tmp_path / "config.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump(settings_document(settings)))
    return await run_python("-m", "worker", "dlq", *args, "--config", str(config), timeout_s=120)


def settings_document(settings: Settings) -> dict[str, object]:
    return make_document(
        settings.broker.exchange,
        [endpoint(e.name, e.url, list(e.events)) for e in settings.endpoints],
    )


async def test_list_filters_by_reason_type_and_since_and_prints_json(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """--reason, --type (topic patterns too) and --since narrow the list; --json prints one
    object per line; nothing leaves the queue."""
    old = (datetime.now(UTC) - timedelta(days=3)).isoformat(timespec="seconds")
    await put_dead_letters(broker, exchange_name, 2, dead_lettered_at=old, prefix="old")
    await put_dead_letters(
        broker,
        exchange_name,
        3,
        reason="no_retry_status",
        prefix="gone",
        event_type="order.cancelled",
    )
    await put_dead_letters(
        broker, exchange_name, 1, endpoint_name="b", prefix="b", event_type="order.created"
    )
    select = dlq.Selection
    assert len(await dlq.list_dead_letters(declared, select(reason="no_retry_status"))) == 3
    assert len(await dlq.list_dead_letters(declared, select(event_type="order.*"))) == 4
    assert len(await dlq.list_dead_letters(declared, select(event_type="order.created"))) == 1
    recent = await dlq.list_dead_letters(
        declared, select(since=datetime.now(UTC) - timedelta(hours=1))
    )
    assert sorted(letter.event_id for letter in recent) == ["b-0", "gone-0", "gone-1", "gone-2"]
    code, out, _ = await run_cli(
        declared, tmp_path, "list", "--json", "--since", "2d", "--endpoint", "a"
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["event_id"] for row in rows] == ["gone-0", "gone-1", "gone-2"]
    assert rows[0]["reason"] == "no_retry_status" and rows[0]["event_type"] == "order.cancelled"
    await broker.wait_depth(dead_letter_queue(exchange_name), 6)


async def test_export_appends_json_lines_and_removes_only_what_it_wrote(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """export writes each dead letter (fields, headers, body) to the file, then removes it;
    a second export appends; a filter leaves the rest."""
    ids = await put_dead_letters(broker, exchange_name, 250)
    await put_dead_letters(broker, exchange_name, 2, endpoint_name="b", prefix="b")
    archive = tmp_path / "dead.jsonl"
    code, out, _ = await run_cli(
        declared, tmp_path, "export", "--file", str(archive), "--endpoint", "a"
    )
    assert (code, out.strip()) == (0, f"250 exported to {archive}")
    await broker.wait_depth(dead_letter_queue(exchange_name), 2)
    await run_cli(declared, tmp_path, "export", "--file", str(archive))
    records = [json.loads(line) for line in archive.read_text().splitlines()]
    assert [r["message_id"] for r in records] == [*ids, "b-0", "b-1"]
    first = records[0]
    assert first["dead_letter"]["reason"] == "attempts_exhausted"
    assert first["headers"]["hookline-endpoint"] == "a"
    assert json.loads(first["body"])["id"] == ids[0]
    await broker.wait_depth(dead_letter_queue(exchange_name), 0)


async def test_export_killed_midway_loses_nothing(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """SIGKILL during an export: every dead letter is in the file or still in the queue."""
    ids = await put_dead_letters(broker, exchange_name, 4000)
    archive = tmp_path / "dead.jsonl"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings_document(declared)))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "dlq",
        "export",
        "--file",
        str(archive),
        "--config",
        str(config),
        cwd=REPO,
    )
    while not archive.exists() or archive.stat().st_size < 50_000:
        assert process.returncode is None, "export finished before it could be interrupted"
        await asyncio.sleep(0.005)
    process.kill()
    await process.wait()
    exported = {
        json.loads(line)["message_id"]
        for line in archive.read_text().splitlines()
        if line.endswith("}")
    }
    remaining = {m.message_id for m in await _read_all(broker, exchange_name, len(ids))}
    assert remaining, "the export should have been interrupted midway"
    assert exported | remaining == set(ids)


async def _read_all(broker: Broker, exchange: str, at_most: int) -> list[AbstractIncomingMessage]:
    """Wait for the killed command's unacked messages to return, then take them all."""
    await eventually(lambda: _depth_settled(broker, exchange), timeout_s=15)
    return await broker.drain(dead_letter_queue(exchange))


async def _depth_settled(broker: Broker, exchange: str) -> bool:
    first = await broker.depth(dead_letter_queue(exchange))
    await asyncio.sleep(0.3)
    return first == await broker.depth(dead_letter_queue(exchange))


async def test_replay_dry_run_changes_nothing_and_rate_paces(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """--dry-run lists what would be replayed and leaves it; --rate 40/s takes its time."""
    await put_dead_letters(broker, exchange_name, 60)
    code, out, _ = await run_cli(declared, tmp_path, "replay", "--dry-run")
    assert code == 0 and out.splitlines()[-1] == "60 to replay (dry run)"
    assert out.startswith("would replay dl-0 -> a")
    await broker.wait_depth(dead_letter_queue(exchange_name), 60)
    assert await broker.depth(endpoint_queue(exchange_name, "a")) == 0
    started = time.monotonic()
    code, out, _ = await run_cli(declared, tmp_path, "replay", "--rate", "40/s")
    # 4 in the first burst, 56 more at 40/s.
    assert time.monotonic() - started >= 1.3
    assert out.splitlines()[-1] == "60 replayed"
    await broker.wait_depth(endpoint_queue(exchange_name, "a"), 60)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
async def test_replay_interrupted_midway_loses_nothing(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path, signum: int
) -> None:
    """Ctrl-C or SIGKILL during a paced replay: each dead letter is in the endpoint's queue
    or still in the dead-letter queue; Ctrl-C says so and exits 130."""
    ids = await put_dead_letters(broker, exchange_name, 200)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings_document(declared)))
    # 10 s of replaying at 20/s: the signal lands in the middle even on a slow run.
    process = await _paced_replay(config, "20/s", stderr=asyncio.subprocess.PIPE)
    await eventually(
        lambda: _at_least(broker, endpoint_queue(exchange_name, "a"), 20), timeout_s=20
    )
    process.send_signal(signum)
    _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    if signum == signal.SIGINT:
        assert process.returncode == 130
        assert "nothing lost" in err.decode()
    replayed = {m.message_id for m in await broker.drain(endpoint_queue(exchange_name, "a"))}
    remaining = {m.message_id for m in await _read_all(broker, exchange_name, len(ids))}
    assert remaining and replayed
    assert replayed | remaining == set(ids)


async def _at_least(broker: Broker, queue: str, count: int) -> bool:
    return await broker.depth(queue) >= count


async def _paced_replay(config: Path, rate: str, *, stderr: int) -> asyncio.subprocess.Process:
    """``dlq replay --rate RATE`` in a subprocess, its stderr to ``stderr``."""
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "worker", "dlq", "replay", "--rate", rate),
        *("--config", str(config)),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
    )


async def test_replay_shows_a_progress_bar_on_a_terminal(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """On a terminal, replay draws a rich progress bar on stderr; in a pipe, it does not."""
    await put_dead_letters(broker, exchange_name, 30)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings_document(declared)))
    leader, follower = pty.openpty()
    try:
        process = await _paced_replay(config, "20/s", stderr=follower)
        os.close(follower)
        await asyncio.wait_for(process.wait(), timeout=60)
        drawn = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(leader, 65536):
                drawn += chunk
    finally:
        os.close(leader)
    assert process.returncode == 0
    assert b"replaying" in drawn and b"/30" in drawn
    _, _, err = await run_cli(declared, tmp_path, "replay")
    assert "replaying" not in err


async def test_list_and_replay_escape_terminal_controls_from_publishers(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """Ids, types and header values of dead letters are publisher-controlled: list, list
    --json and replay print control, C1 and bidi characters as visible escapes, and --json
    still gives back the exact values."""
    hostile_id = f"evt-{TERMINAL_ATTACK}\x7f"
    body = json.dumps({"id": hostile_id, "type": f"to.a{TERMINAL_ATTACK}", "data": {}}).encode()
    hostile_headers = {
        "hookline-endpoint": "a",
        "hookline-reason": f"attempts_exhausted{TERMINAL_ATTACK}",
        "hookline-attempts": 3,
        "hookline-last-status": TERMINAL_ATTACK,
        "hookline-dead-lettered-at": f"2026-11-28T12:00:00+00:00{TERMINAL_ATTACK}",
        "hookline-detail": TERMINAL_ATTACK,
    }
    channel = await broker.channel()
    try:
        await put_raw_dead_letter(channel, exchange_name, body, hostile_headers, "m-1")
        await put_raw_dead_letter(
            channel, exchange_name, b"\x9b[31m not JSON", {"hookline-endpoint": "b\u2066x"}
        )
    finally:
        await channel.close()

    code, out, err = await run_cli(declared, tmp_path, "list")
    assert code == 0, err
    assert_terminal_safe(out)
    assert "evt-\\x1b[2J\\x9b\\u202e[bold red]\\x7f" in out
    assert "b\\u2066x" in out and "2 dead letters" in out

    code, out, err = await run_cli(declared, tmp_path, "list", "--json")
    assert code == 0, err
    assert_terminal_safe(out)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["event_id"] == hostile_id
    assert rows[0]["reason"] == hostile_headers["hookline-reason"]
    assert rows[0]["detail"] == TERMINAL_ATTACK
    assert rows[1]["endpoint"] == "b\u2066x"

    code, out, err = await run_cli(declared, tmp_path, "replay", "--dry-run", "--endpoint", "a")
    assert code == 0, err
    assert_terminal_safe(out)
    assert out.splitlines()[0] == "would replay evt-\\x1b[2J\\x9b\\u202e[bold red]\\x7f -> a"
    await broker.wait_depth(dead_letter_queue(exchange_name), 2)


def strict_json(line: str) -> Any:
    """Parse as any JSON reader would: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def without_broker_headers(exported: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in exported.items() if not name.startswith("x-")}


async def test_export_writes_every_amqp_field_type_as_strict_json(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """Headers of every AMQP type (decimals, floats, byte arrays that are not UTF-8,
    timestamps, nested tables and arrays, void, booleans) and a body id with a lone
    surrogate are exported as strict JSON that keeps their values, and the messages leave
    the queue (the export used to stop at such a message on every rerun). RabbitMQ itself
    refuses NaN and infinite float headers; the next test covers those."""
    odd_headers = {
        "hookline-endpoint": "a",
        "hookline-reason": "attempts_exhausted",
        "price": Decimal("12.50"),
        "ratio": 0.5,
        "negative": -2.25,
        "raw": bytearray(b"\xff\x00\xfe"),
        "utf8_bytes": bytearray("café".encode()),
        "at": datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC),
        "nested": {"list": [Decimal("-1.1"), None, True, {"deep": bytearray(b"\x80")}], "n": -5},
        "void": None,
        "flag": False,
    }
    channel = await broker.channel()
    try:
        await put_raw_dead_letter(
            channel, exchange_name, b'{"id": "evt\\ud800", "type": "to.a"}', odd_headers, "m-1"
        )
        await put_raw_dead_letter(channel, exchange_name, b"\xff\xfe", {"x": Decimal("1")}, "m-2")
    finally:
        await channel.close()
    archive = tmp_path / "dead.jsonl"
    code, out, err = await run_cli(declared, tmp_path, "export", "--file", str(archive))
    assert (code, out.strip()) == (0, f"2 exported to {archive}"), err
    await broker.wait_depth(dead_letter_queue(exchange_name), 0)
    first, second = (strict_json(line) for line in archive.read_text("utf-8").splitlines())
    assert first["message_id"] == "m-1"
    assert first["dead_letter"]["event_id"] == "evt\\ud800"
    # The broker adds its own (x-delivery-count on quorum queues).
    assert without_broker_headers(first["headers"]) == {
        "hookline-endpoint": "a",
        "hookline-reason": "attempts_exhausted",
        "price": "12.50",
        "ratio": 0.5,
        "negative": -2.25,
        "raw": {"$bytes_base64": base64.b64encode(b"\xff\x00\xfe").decode()},
        "utf8_bytes": "café",
        "at": "2026-11-28T12:00:00+00:00",
        "nested": {
            "list": ["-1.1", None, True, {"deep": {"$bytes_base64": "gA=="}}],
            "n": -5,
        },
        "void": None,
        "flag": False,
    }
    assert json.loads(first["body"])["type"] == "to.a"
    assert without_broker_headers(second["headers"]) == {"x": "1"}
    assert second["body_base64"] == "//4="


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), amqp_field_values()))
def test_any_header_table_exports_as_strict_json(table: dict[str, Any]) -> None:
    """Whatever values a header table holds (NaN and infinities included, which RabbitMQ
    refuses but other brokers may pass), its exported form is strict, UTF-8 JSON."""
    line = json.dumps(dlq._plain(table), ensure_ascii=False, allow_nan=False)
    line.encode("utf-8")
    assert strict_json(line).keys() == table.keys()
    special = {"n": float("nan"), "i": float("inf"), "m": float("-inf"), "d": Decimal("NaN")}
    assert dlq._plain(special) == {"n": "NaN", "i": "Infinity", "m": "-Infinity", "d": "NaN"}


# Delivery limits: nothing vanishes, and the tools never push a letter over one.


def regex(name: str) -> str:
    """``name`` as a literal in a policy pattern."""
    return re.escape(name)


async def requeue_until_dead_lettered(broker: Broker, exchange: str, queue: str) -> int:
    """Take a message from ``queue`` and give it back (nack, requeue) until the broker
    dead-letters it for its delivery limit; returns how often it was given back."""
    channel = await broker.channel()
    given_back = 0
    already = await broker.depth(dead_letter_queue(exchange))
    try:
        work = await channel.declare_queue(queue, passive=True)
        deadline = time.monotonic() + 15
        while await broker.depth(dead_letter_queue(exchange)) == already:
            assert time.monotonic() < deadline, "the broker never dead-lettered it"
            message = await work.get(no_ack=False, fail=False)
            if message is not None:
                await message.nack(requeue=True)
                given_back += 1
            await asyncio.sleep(0.02)
    finally:
        await channel.close()
    return given_back


async def test_event_over_a_delivery_limit_is_dead_lettered_listed_and_replayable(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """With a delivery-limit policy on the work queue, an event given back too often lands
    in the dead-letter queue (not dropped); `dlq list --json` shows it with reason
    delivery_limit, its endpoint (from the x-death queue), attempts from hookline-attempts
    and the broker's time; replay sends it back to its endpoint without the broker's headers."""
    work_queue = endpoint_queue(exchange_name, "a")
    async with queue_policy(
        f"{exchange_name}-limit", f"^{regex(exchange_name)}\\.endpoint\\.", {"delivery-limit": 2}
    ):
        event_id, body = build_body("to.a", {"n": 1}, event_id="limited-1")
        await broker.publish(
            exchange_name, "to.a", body, message_id=event_id, headers={"hookline-attempts": 2}
        )
        await broker.wait_depth(work_queue, 1)
        assert await requeue_until_dead_lettered(broker, exchange_name, work_queue) >= 3
    code, out, err = await run_cli(declared, tmp_path, "list", "--json")
    assert code == 0, err
    [row] = [json.loads(line) for line in out.splitlines()]
    fields = (row["event_id"], row["event_type"], row["endpoint"], row["reason"])
    assert fields == ("limited-1", "to.a", "a", "delivery_limit")
    assert row["attempts"] == 2
    moment = datetime.fromisoformat(row["dead_lettered_at"])
    assert abs((datetime.now(UTC) - moment).total_seconds()) < 60
    assert work_queue in row["detail"]
    selected = await dlq.list_dead_letters(
        declared, dlq.Selection(endpoint="a", reason="delivery_limit")
    )
    assert [letter.event_id for letter in selected] == ["limited-1"]

    report = await dlq.replay(declared, dlq.Selection(reason="delivery_limit"))
    assert [letter.event_id for letter in report.replayed] == ["limited-1"]
    [replayed] = await broker.drain(work_queue)
    assert replayed.body == body
    copied = [name for name in replayed.headers or {} if name != "x-delivery-count"]
    # No broker or Hookline state from the dead letter; only the replay's own publish time.
    state = [name for name in copied if name.startswith(("x-", "hookline-"))]
    assert state == ["hookline-published-at"], copied
    await broker.wait_depth(dead_letter_queue(exchange_name), 0)


async def test_repeated_reads_never_push_a_dead_letter_toward_a_delivery_limit(
    declared: Settings, exchange_name: str, broker: Broker
) -> None:
    """Every list returns what it read, which a quorum queue counts as a delivery. A letter
    read with a count of REFRESH_AT_DELIVERY_COUNT is replaced by a fresh copy (same body and
    headers), so twelve lists leave no count above it."""
    ids = await put_dead_letters(broker, exchange_name, 3, reason="no_retry_status")
    dead_letter = dead_letter_queue(exchange_name)
    for _ in range(12):
        await broker.wait_depth(dead_letter, 3)
        letters = await dlq.list_dead_letters(declared)
        assert sorted(letter.event_id for letter in letters) == ids
    await broker.wait_depth(dead_letter, 3)
    messages = await broker.drain(dead_letter)
    counts = [int((m.headers or {}).get("x-delivery-count", 0)) for m in messages]
    assert max(counts) <= REFRESH_AT_DELIVERY_COUNT, counts
    assert {str((m.headers or {})["hookline-reason"]) for m in messages} == {"no_retry_status"}
    assert {str((m.headers or {})["hookline-detail"]) for m in messages} == {"test"}


async def test_fresh_copy_of_a_broker_dead_letter_keeps_what_x_death_said(
    declared: Settings, exchange_name: str, broker: Broker
) -> None:
    """A fresh copy carries no x- headers, so what the broker's x-death said about a letter
    it dead-lettered (endpoint, reason, time) is written into hookline-* headers: the copy
    lists the same, and replays the same."""
    work_queue = endpoint_queue(exchange_name, "a")
    async with queue_policy(
        f"{exchange_name}-limit", f"^{regex(exchange_name)}\\.endpoint\\.", {"delivery-limit": 1}
    ):
        event_id, body = build_body("to.a", {"n": 1}, event_id="limited-1")
        await broker.publish(exchange_name, "to.a", body, message_id=event_id)
        await broker.wait_depth(work_queue, 1)
        await requeue_until_dead_lettered(broker, exchange_name, work_queue)
    dead_letter = dead_letter_queue(exchange_name)
    [before] = await dlq.list_dead_letters(declared)
    for _ in range(REFRESH_AT_DELIVERY_COUNT + 1):
        await broker.wait_depth(dead_letter, 1)
        assert await dlq.list_dead_letters(declared) == [before]
    await broker.wait_depth(dead_letter, 1)
    [copy] = await peek_all(broker, dead_letter)
    found = copy.headers or {}
    assert "x-death" not in found and copy.body == body
    assert (found["hookline-reason"], found["hookline-endpoint"]) == ("delivery_limit", "a")
    assert found["hookline-dead-lettered-at"] == before.dead_lettered_at
    assert [letter.event_id for letter in (await dlq.replay(declared)).replayed] == ["limited-1"]
    await broker.wait_depth(work_queue, 1)


async def test_low_delivery_limit_on_the_dead_letter_queue_loses_nothing(
    declared: Settings, exchange_name: str, broker: Broker
) -> None:
    """A policy limit of 1 on the dead-letter queue pushes letters out after two lists;
    they wait in the overflow queue and the next command moves them back, so every list
    shows all of them."""
    dead_letter = dead_letter_queue(exchange_name)
    overflow = dead_letter_overflow_queue(exchange_name)
    ids = await put_dead_letters(broker, exchange_name, 5)
    overflowed = 0
    async with queue_policy(
        f"{exchange_name}-dlq-limit", f"^{regex(dead_letter)}$", {"delivery-limit": 1}
    ):
        for _ in range(6):
            await eventually(lambda: _holding(broker, [dead_letter, overflow], 5))
            inspected = await inspect_queue(broker.connection, overflow)
            overflowed = max(overflowed, inspected[0] if inspected is not None else 0)
            letters = await dlq.list_dead_letters(declared)
            assert sorted(letter.event_id for letter in letters) == ids
    assert overflowed == 5, "the limit should have pushed every letter into the overflow queue"
    await eventually(lambda: _holding(broker, [dead_letter, overflow], 5))
    code_ids = {letter.event_id for letter in await dlq.list_dead_letters(declared)}
    assert code_ids == set(ids)


async def _holding(broker: Broker, queues: list[str], count: int) -> bool:
    found = [await inspect_queue(broker.connection, name) for name in queues]
    return sum(inspected[0] for inspected in found if inspected is not None) == count


# What stays configured while another endpoint is retired.
KEPT_ENDPOINT = endpoint("kept", "http://127.0.0.1/kept", ["kept.#"])


async def test_retire_empties_legacy_delay_queues_of_an_earlier_schedule(
    tmp_path: Path, exchange_name: str, broker: Broker
) -> None:
    """Events waiting in a per-endpoint delay queue of Hookline before 0.2, of a tier of an
    earlier retry.delays_s schedule, are found through the delay-tier manifest: retire moves
    them too and deletes that queue, which would otherwise expire them into a deleted work
    queue."""
    endpoints = [endpoint("gone", "http://127.0.0.1/", ["gone.#"])]
    settings = make_settings(exchange_name, endpoints)
    old_tier = await strand_in_legacy_tier(broker, settings, "gone", 60, 3)
    config = write_config(tmp_path, make_document(exchange_name, [KEPT_ENDPOINT]))
    try:
        code, out, err = await run_python(
            "-m", "worker", "dlq", "retire", "--config", str(config), "--endpoint", "gone"
        )
        assert (code, out.strip()) == (
            0,
            "3 moved to the dead-letter queue (reason endpoint_removed)",
        ), err
        for name in (old_tier, endpoint_queue(exchange_name, "gone")):
            assert await inspect_queue(broker.connection, name) is None, name
        letters = await broker.drain(dead_letter_queue(exchange_name))
        assert sorted(m.message_id or "" for m in letters) == [f"stranded-{n}" for n in range(3)]
        assert all(old_tier in str((m.headers or {})["hookline-detail"]) for m in letters)
    finally:
        await broker.delete_all(
            settings.model_copy(update={"retry": RetrySettings(delays_s=(60,))})
        )
        await broker.delete_all(settings)
        await broker.delete_all(make_settings(exchange_name, [KEPT_ENDPOINT]))


async def test_a_retry_waiting_when_its_endpoint_is_retired_becomes_a_dead_letter(
    tmp_path: Path, exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """A retry waiting in a shared delay tier while its endpoint is retired is not lost:
    it reaches the dead-letter queue as endpoint_removed of that endpoint (moved by retire if
    it expired first, through the retry exchange's alternate exchange if not)."""
    receiver.script("/gone", 503)
    endpoints = [endpoint("gone", receiver.url("/gone"), ["gone.#"])]
    settings = make_settings(exchange_name, endpoints, retry={"delays_s": [2, 60]})
    try:
        worker = await run_worker(settings)
        await publish_events(exchange_name, 1, "gone.event", "waiting")
        await receiver.wait_for(lambda: len(receiver.on("/gone")) == 1)
        await run_worker.stop(worker)
        config = write_config(
            tmp_path, make_document(exchange_name, [KEPT_ENDPOINT], retry={"delays_s": [2, 60]})
        )
        code, _, err = await run_python(
            "-m", "worker", "dlq", "retire", "--config", str(config), "--endpoint", "gone"
        )
        assert code == 0, err
        await broker.wait_depth(dead_letter_queue(exchange_name), 1, timeout_s=15)
        letters = await dlq.list_dead_letters(settings)
        assert [(d.endpoint, d.reason, d.attempts) for d in letters] == [
            ("gone", "endpoint_removed", 1)
        ]
        assert await inspect_queue(broker.connection, endpoint_queue(exchange_name, "gone")) is None
    finally:
        await broker.delete_all(settings)
        await broker.delete_all(make_settings(exchange_name, [KEPT_ENDPOINT]))


async def test_a_removed_endpoints_dead_letters_are_selected_by_name(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """After 'legacy' left the config, list, export and purge --endpoint legacy select its
    dead letters by their hookline-endpoint header, with a warning instead of a refusal."""
    await put_dead_letters(broker, exchange_name, 2, endpoint_name="legacy", prefix="legacy")
    await put_dead_letters(broker, exchange_name, 1, endpoint_name="a", prefix="kept")
    code, out, err = await run_cli(declared, tmp_path, "list", "--json", "--endpoint", "legacy")
    assert code == 0, err
    assert [json.loads(line)["event_id"] for line in out.splitlines()] == ["legacy-0", "legacy-1"]
    assert "warning:" in err and "no endpoint named 'legacy'" in err
    archive = tmp_path / "legacy.jsonl"
    code, out, _ = await run_cli(
        declared, tmp_path, "export", "--endpoint", "legacy", "--file", str(archive)
    )
    assert (code, out.strip()) == (0, f"2 exported to {archive}")
    await put_dead_letters(broker, exchange_name, 1, endpoint_name="legacy", prefix="late")
    code, out, _ = await run_cli(declared, tmp_path, "purge", "--endpoint", "legacy", "--yes")
    assert (code, out.strip()) == (0, "1 purged")
    await broker.wait_depth(dead_letter_queue(exchange_name), 1)


async def test_until_bounds_every_command_so_old_letters_can_be_archived(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """--until (same forms as --since) keeps what is newer: "archive everything older than
    a week" exports exactly the old letters, and list orders by dead-lettered time."""
    now = datetime.now(UTC)
    for days, prefix in ((10, "ten"), (1, "one"), (30, "thirty")):
        moment = (now - timedelta(days=days)).isoformat(timespec="seconds")
        await put_dead_letters(broker, exchange_name, 1, dead_lettered_at=moment, prefix=prefix)
    code, out, _ = await run_cli(declared, tmp_path, "list", "--json", "--until", "7d")
    assert code == 0
    assert [json.loads(line)["event_id"] for line in out.splitlines()] == ["thirty-0", "ten-0"]
    _, out, _ = await run_cli(declared, tmp_path, "list", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["event_id"] for row in rows] == ["thirty-0", "ten-0", "one-0"]
    assert all(isinstance(row["attempts"], int) for row in rows)
    archive = tmp_path / "old.jsonl"
    code, out, _ = await run_cli(
        declared, tmp_path, "export", "--until", "7d", "--file", str(archive)
    )
    assert (code, out.strip()) == (0, f"2 exported to {archive}")
    await broker.wait_depth(dead_letter_queue(exchange_name), 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--reason", "nope"], "must be one of invalid_envelope"),
        (["replay", "--rate", "20"], "with its unit, such as 20/s"),
        (["retire", "--endpoint", "neverexisted"], "no queue of an endpoint named 'neverexisted'"),
    ],
)
async def test_mistakes_are_errors_not_silent_successes(
    declared: Settings, tmp_path: Path, args: list[str], message: str
) -> None:
    """An unknown reason, a rate without its unit and retiring a name that has no queue
    exit 2 with a message saying what is valid, instead of "0 dead letters" or "0 moved"."""
    code, out, err = await run_cli(declared, tmp_path, *args)
    assert code == 2, out
    assert message in err


async def test_replay_reports_each_event_as_it_goes(
    declared: Settings, exchange_name: str, broker: Broker, tmp_path: Path
) -> None:
    """At 2/s, the first "replayed" line is printed well before the last letter is done, so
    an interrupted replay has told what it did."""
    await put_dead_letters(broker, exchange_name, 4, prefix="slow")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings_document(declared)))
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "worker", "dlq", "replay", "--rate", "2/s"),
        *("--config", str(config)),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), timeout=60)
    first_at = time.monotonic() - started
    rest = await asyncio.wait_for(process.stdout.read(), timeout=60)
    done_at = time.monotonic() - started
    assert await process.wait() == 0
    assert first.decode().startswith("replayed slow-")
    assert rest.decode().splitlines()[-1] == "4 replayed"
    assert done_at - first_at >= 1.0
