"""The command lines, run as real processes: worker run/check-config/dlq and producer publish."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import aio_pika
import aiohttp
import pytest
import yaml

from tests.conftest import (
    SECRET_A,
    Broker,
    Receiver,
    WorkerProcess,
    endpoint,
    make_document,
    run_python,
    write_config,
)
from worker.settings import settings_from_document
from worker.topology import dead_letter_queue, endpoint_queue


@pytest.fixture
async def config(tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker):  # type: ignore[no-untyped-def]
    document = make_document(
        exchange_name,
        [
            endpoint("orders", receiver.url("/orders"), ["order.*"]),
            endpoint("slow", receiver.url("/slow"), ["slow.*"], max_in_flight=5),
        ],
    )
    yield write_config(tmp_path, document)
    await broker.delete_all(settings_from_document(document, Path("x"), {}))


async def test_check_config_prints_endpoints_and_bindings(config: Path) -> None:
    """check-config validates and summarises each endpoint's queue and bindings."""
    code, out, _ = await run_python("-m", "worker", "check-config", "--config", str(config))
    assert code == 0
    assert "orders" in out and "order.*" in out and ".endpoint.orders" in out
    assert SECRET_A not in out


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "worker", "run"],
        ["-m", "worker", "check-config"],
        ["-m", "worker", "dlq", "list"],
        ["-m", "producer", "publish", "--type", "a.b"],
    ],
)
async def test_bad_config_exits_2_without_traceback(tmp_path: Path, command: list[str]) -> None:
    """Every command reports a bad config in one clear message naming file and field, exit 2."""
    bad = write_config(
        tmp_path, {"broker": {"url": "amqp://x/", "exchang": "typo"}, "endpoints": []}
    )
    code, out, err = await run_python(*command, "--config", str(bad))
    assert code == 2
    assert "Traceback" not in err + out
    assert f"{bad}: broker.exchang: unknown key" in err
    code, _, err = await run_python(*command, "--config", str(tmp_path / "missing.yaml"))
    assert (code, "missing.yaml: file not found" in err, "Traceback" in err) == (2, True, False)


async def test_producer_cli_publishes_and_reports(
    config: Path, broker: Broker, exchange_name: str, tmp_path: Path
) -> None:
    """publish prints confirmed ids; --file publishes every line; unroutable and bad input fail."""
    await broker.declare(settings_from_document(yaml.safe_load(config.read_text()), config, {}))
    code, out, _ = await run_python(
        "-m",
        "producer",
        "publish",
        "--config",
        str(config),
        "--type",
        "order.created",
        "--data",
        '{"n": 1}',
        "--id",
        "cli-1",
    )
    assert (code, out.strip()) == (0, "cli-1")
    lines = tmp_path / "events.jsonl"
    lines.write_text(
        "\n".join(json.dumps({"type": "order.paid", "data": {"i": i}}) for i in range(5))
    )
    code, out, _ = await run_python(
        "-m", "producer", "publish", "--config", str(config), "--file", str(lines)
    )
    assert code == 0 and len(out.split()) == 5
    assert await broker.depth(endpoint_queue(exchange_name, "orders")) == 6
    code, _, err = await run_python(
        "-m", "producer", "publish", "--config", str(config), "--type", "nobody.listens"
    )
    assert code == 1 and "no queue is bound" in err
    code, _, err = await run_python(
        "-m", "producer", "publish", "--config", str(config), "--type", "a.b", "--data", "[1]"
    )
    assert code == 2 and "--data" in err


async def test_worker_run_drains_on_sigterm_and_exits_0(
    config: Path, receiver: Receiver, broker: Broker, exchange_name: str
) -> None:
    """SIGTERM stops consuming, lets in-flight deliveries finish, returns the rest, exits 0."""
    receiver.script("/slow", (200, {}, 1.0))
    events = write_events(config.parent, "slow.job", 12)
    async with WorkerProcess(config) as worker:
        await worker.wait_for_log("worker_consuming")
        code, _, _ = await run_python(
            "-m", "producer", "publish", "--config", str(config), "--file", str(events)
        )
        assert code == 0
        await receiver.wait_for(lambda: len(receiver.requests) == 5)
        assert await worker.stop() == 0, "".join(worker.log_lines)
    assert worker.events().count("delivery_succeeded") == 5
    assert worker.events()[-1] == "worker_stopped"
    assert len(receiver.requests) == 5
    await broker.wait_depth(endpoint_queue(exchange_name, "slow"), 7)


async def test_worker_waits_for_an_unreachable_broker(tmp_path: Path) -> None:
    """An unreachable broker at start is logged (once per try, by Hookline alone) and
    retried; SIGTERM still exits 0."""
    document = make_document(
        "hl-nobroker",
        [endpoint("e", "http://127.0.0.1/", ["#"])],
        broker={"url": "amqp://guest:guest@127.0.0.1:1/"},
    )
    async with WorkerProcess(write_config(tmp_path, document)) as worker:
        record = await worker.wait_for_log("broker_unreachable")
        assert "guest:guest" not in json.dumps(record)
        await worker.wait_for_log("broker_unreachable", after=record)
        assert await worker.stop(timeout_s=10) == 0
    # Hookline's own line only: the AMQP library's report of the same failure is dropped.
    assert not [line for line in worker.log_lines if "creating transport" in line]


async def test_dlq_commands(config: Path, broker: Broker, exchange_name: str) -> None:
    """dlq list prints a table; purge insists on --yes; replay reports what it sent."""
    code, out, _ = await run_python("-m", "worker", "dlq", "list", "--config", str(config))
    assert code == 0 and out.strip().endswith("0 dead letters")
    channel = await broker.connection.channel()
    await channel.default_exchange.publish(
        aio_pika.Message(
            b'{"id":"d-1","type":"order.x","timestamp":"2026-01-01T00:00:00Z","data":{}}',
            headers={
                "hookline-endpoint": "orders",
                "hookline-reason": "attempts_exhausted",
                "hookline-attempts": 9,
                "hookline-last-status": "500",
                "hookline-dead-lettered-at": "2026-01-01T00:00:00+00:00",
            },
        ),
        dead_letter_queue(exchange_name),
    )
    await channel.close()
    code, out, _ = await run_python(
        "-m", "worker", "dlq", "list", "--config", str(config), "--endpoint", "orders"
    )
    assert code == 0 and "d-1" in out and "attempts_exhausted" in out and "1 dead letter" in out
    code, _, err = await run_python("-m", "worker", "dlq", "purge", "--config", str(config))
    assert code == 2 and "--yes" in err
    code, out, _ = await run_python("-m", "worker", "dlq", "replay", "--config", str(config))
    assert code == 0 and "replayed d-1 -> orders" in out
    assert await broker.depth(endpoint_queue(exchange_name, "orders")) == 1
    code, out, err = await run_python(
        "-m", "worker", "dlq", "list", "--config", str(config), "--endpoint", "nope"
    )
    # Not configured: selected by header all the same, with a warning (it may be removed).
    assert code == 0 and "warning:" in err and "'nope'" in err and "0 dead letters" in out
    code, _, err = await run_python(
        "-m", "worker", "send-test", "--config", str(config), "--endpoint", "nope"
    )
    assert code == 2 and "no endpoint named 'nope'" in err


def write_events(directory: Path, event_type: str, count: int) -> Path:
    path = directory / "events.jsonl"
    path.write_text(
        "\n".join(json.dumps({"type": event_type, "data": {"i": i}}) for i in range(count))
    )
    return path


async def test_secrets_never_appear_in_any_output(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """Endpoint secrets appear nowhere: check-config, a worker's whole log through delivery,
    retries and dead-lettering, /metrics, dlq list, or a config error about a secret."""
    secret = "whsec_" + base64.b64encode(b"hookline-secret-canary-0123456789").decode()
    fragments = [secret, secret.removeprefix("whsec_"), "hookline-secret-canary"]
    document = make_document(
        exchange_name,
        [
            endpoint("ok", receiver.url("/ok"), ["canary.*"], secret=secret),
            endpoint("bad", receiver.url("/bad"), ["canary.*"], secret=secret),
        ],
        retry={"delays_s": [0.1]},
    )
    receiver.script("/bad", 500)
    config = write_config(tmp_path, document)
    try:
        outputs: list[str] = []
        code, out, err = await run_python("-m", "worker", "check-config", "--config", str(config))
        outputs += [out, err]
        async with WorkerProcess(config) as worker:
            started = await worker.wait_for_log("worker_consuming")
            code, out, err = await run_python(
                "-m", "producer", "publish", "--config", str(config), "--type", "canary.x"
            )
            outputs += [out, err]
            await receiver.wait_for(lambda: len(receiver.on("/bad")) == 2)
            port = json.loads(next(line for line in worker.log_lines if "worker_starting" in line))[
                "metrics_port"
            ]
            url = f"http://127.0.0.1:{port}/metrics"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                outputs.append(await response.text())
            await asyncio.sleep(0.3)
            assert await worker.stop() == 0
        outputs += worker.log_lines
        code, out, err = await run_python("-m", "worker", "dlq", "list", "--config", str(config))
        outputs += [out, err]
    finally:
        await broker.delete_all(settings_from_document(document, config, {}))
    document["endpoints"][0]["secret"] = secret[:20]  # too short: rejected at load
    code, out, err = await run_python(
        "-m", "worker", "check-config", "--config", str(write_config(tmp_path, document))
    )
    outputs += [out, err]
    assert code == 2
    everything = "\n".join(outputs)
    assert "delivery_dead_lettered" in everything and started
    for fragment in fragments:
        assert fragment not in everything
    assert "guest:guest" not in everything


async def test_publish_waits_for_the_broker_then_fails_with_one_line(tmp_path: Path) -> None:
    """With no broker, `producer publish` waits broker.publish_retry_for_s, then exits 1
    with Hookline's error line only: no AMQP library log line before it."""
    document = make_document(
        "hl-nobroker",
        [endpoint("e", "http://127.0.0.1/", ["#"])],
        broker={"url": "amqp://guest:guest@127.0.0.1:1/", "publish_retry_for_s": 1.5},
    )
    config = write_config(tmp_path, document)
    started = time.monotonic()
    code, out, err = await run_python(
        "-m", "producer", "publish", "--config", str(config), "--type", "a.b"
    )
    assert code == 1
    assert time.monotonic() - started >= 1.4
    assert out == ""
    assert err.splitlines() == [
        "error: cannot publish to amqp://guest:****@127.0.0.1:1/: broker did not answer "
        "within 1.5 s (AMQPConnectionError)"
    ]


async def test_check_config_masks_query_strings_and_errors_name_fields(tmp_path: Path) -> None:
    """check-config shows query keys, never their values (tokens); a problem found across
    fields names its field, and every line of the error output starts with "error:"."""
    document = make_document(
        "hl-mask",
        [endpoint("e", "http://example.com/hook?token=s3cret-token", ["#"])],
    )
    code, out, err = await run_python(
        "-m", "worker", "check-config", "--config", str(write_config(tmp_path, document))
    )
    assert code == 0, err
    assert "https://example.com/hook?token=****" not in out  # http allowed by the test config
    assert "http://example.com/hook?token=****" in out
    assert "s3cret-token" not in out + err
    document["security"]["require_https"] = True
    document["endpoints"].append(endpoint("f", "https://exa mple.com/", ["#"]))
    code, out, err = await run_python(
        "-m", "worker", "check-config", "--config", str(write_config(tmp_path, document))
    )
    assert code == 2
    assert err.splitlines() and all(line.startswith("error: ") for line in err.splitlines())
    assert "endpoints[1].url" in err
    assert "top level" not in err


async def test_publish_file_lines_may_omit_data_and_add_envelope_keys(
    config: Path, broker: Broker, exchange_name: str, tmp_path: Path
) -> None:
    """A --file line without data publishes data {}; keys beyond the envelope's four travel
    in the envelope, as the envelope allows; the four cannot be replaced."""
    await broker.declare(settings_from_document(yaml.safe_load(config.read_text()), config, {}))
    lines = tmp_path / "events.jsonl"
    lines.write_text(
        json.dumps({"type": "order.paid", "id": "bare"})
        + "\n"
        + json.dumps({"type": "order.paid", "id": "rich", "subject": "order/7", "v": 2})
    )
    code, out, err = await run_python(
        "-m", "producer", "publish", "--config", str(config), "--file", str(lines)
    )
    assert (code, out.split()) == (0, ["bare", "rich"]), err
    messages = await broker.drain(endpoint_queue(exchange_name, "orders"))
    bodies = {json.loads(m.body)["id"]: json.loads(m.body) for m in messages}
    assert bodies["bare"]["data"] == {}
    assert (bodies["rich"]["subject"], bodies["rich"]["v"]) == ("order/7", 2)
