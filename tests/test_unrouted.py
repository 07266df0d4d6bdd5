"""``python -m worker unrouted``: events that matched no endpoint, listed by type, replayed
once an endpoint subscribes, purged on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from producer.envelope import build_body
from tests.conftest import Broker, endpoint, make_document, make_settings, run_python
from worker.topology import endpoint_queue, unrouted_queue


async def unrouted_cli(config: Path, *args: str) -> tuple[int, str, str]:
    return await run_python("-m", "worker", "unrouted", *args, "--config", str(config))


async def test_list_replay_and_purge_unrouted_events(
    broker: Broker, exchange_name: str, tmp_path: Path
) -> None:
    """Events of types nobody subscribes to (from a non-SDK client) are listed with a count
    per type; after an endpoint for one type is added, replay --dry-run changes nothing,
    replay delivers that type's events to the new endpoint's queue and keeps the others
    (mandatory: still unroutable ones are never captured twice), and purge needs --yes."""
    before = make_settings(exchange_name, [endpoint("a", "http://127.0.0.1/", ["a.*"])])
    after = make_settings(
        exchange_name,
        [
            endpoint("a", "http://127.0.0.1/", ["a.*"]),
            endpoint("late", "http://127.0.0.1/", ["late.*"]),
        ],
    )
    config = tmp_path / "config.yaml"
    try:
        await broker.declare(before)
        for index in range(3):
            _, body = build_body("late.signup", {"n": index}, event_id=f"late-{index}")
            await broker.publish(exchange_name, "late.signup", body)
        _, body = build_body("nobody.cares", {}, event_id="lonely")
        await broker.publish(exchange_name, "nobody.cares", body)
        config.write_text(
            yaml.safe_dump(
                make_document(exchange_name, [endpoint("a", "http://127.0.0.1/", ["a.*"])])
            )
        )
        code, out, _ = await unrouted_cli(config, "list")
        assert code == 0
        assert "4 unrouted events" in out
        assert "     3  late.signup" in out and "     1  nobody.cares" in out
        code, out, _ = await unrouted_cli(config, "list", "--json", "--type", "late.*")
        rows = [json.loads(line) for line in out.splitlines()]
        assert [row["event_id"] for row in rows] == ["late-0", "late-1", "late-2"]
        await broker.declare(after)
        code, out, _ = await unrouted_cli(config, "replay", "--dry-run")
        assert code == 0 and out.splitlines()[-1] == "4 to replay (dry run)"
        await broker.wait_depth(unrouted_queue(exchange_name), 4)
        code, out, _ = await unrouted_cli(config, "replay", "--rate", "50/s")
        assert code == 0, out
        assert out.splitlines()[-1] == ("3 replayed, 1 kept: still no endpoint subscribes to them")
        await broker.wait_depth(endpoint_queue(exchange_name, "late"), 3)
        await broker.wait_depth(unrouted_queue(exchange_name), 1)
        code, _, err = await unrouted_cli(config, "purge")
        assert code == 2 and "add --yes" in err
        code, out, _ = await unrouted_cli(config, "purge", "--yes")
        assert (code, out.strip()) == (0, "1 purged")
        await broker.wait_depth(unrouted_queue(exchange_name), 0)
    finally:
        await broker.delete_all(after)
