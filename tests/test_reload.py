"""Config reload: what a re-read config changes, and SIGHUP on a real worker under load."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from producer import Publisher
from tests.conftest import (
    AMQP_URL,
    SECRET_A,
    SECRET_B,
    Broker,
    Receiver,
    WorkerProcess,
    endpoint,
    eventually,
    make_document,
    make_settings,
    publish_events,
    run_python,
    write_config,
)
from tests.helpers import is_ready, reloading_worker, strand_in_legacy_tier, was_logged
from worker.exceptions import Unroutable
from worker.reload import plan_reload
from worker.topology import dead_letter_queue, endpoint_queue, inspect_queue


def test_plan_names_added_removed_and_changed_endpoints() -> None:
    """Added and removed by name; a rotated secret or new patterns make a change."""
    running = make_settings(
        "x",
        [
            endpoint("a", "http://127.0.0.1:1/a", ["a.#"]),
            endpoint("b", "http://127.0.0.1:1/b", ["b.#"]),
            endpoint("c", "http://127.0.0.1:1/c", ["c.#"]),
        ],
    )
    loaded = make_settings(
        "x",
        [
            {**endpoint("a", "http://127.0.0.1:1/a", ["a.#"]), "secret": SECRET_B},
            endpoint("b", "http://127.0.0.1:1/b", ["b.#", "more.#"]),
            endpoint("d", "http://127.0.0.1:1/d", ["d.#"]),
        ],
    )
    plan = plan_reload(running, loaded)
    assert (plan.added, plan.removed, plan.changed, plan.unchanged) == (
        ("d",),
        ("c",),
        ("a", "b"),
        (),
    )
    assert plan.needs_restart == ()


def test_plan_keeps_restart_only_sections_and_replaces_all_on_global_change() -> None:
    """A new broker or metrics section waits for a restart; a new retry schedule changes
    every endpoint's consumer."""
    running = make_settings("x", [endpoint("a", "http://127.0.0.1:1/a", ["a.#"])])
    loaded = make_settings(
        "y", [endpoint("a", "http://127.0.0.1:1/a", ["a.#"])], retry={"delays_s": [1, 2]}
    )
    plan = plan_reload(running, loaded)
    assert plan.needs_restart == ("broker",)
    assert plan.settings.broker.exchange == "x"
    assert plan.settings.retry.delays_s == (1, 2)
    assert plan.changed == ("a",)


def test_identical_config_changes_nothing() -> None:
    """Reloading the same file is a no-op."""
    settings = make_settings("x", [endpoint("a", "http://127.0.0.1:1/a", ["a.#"])])
    plan = plan_reload(
        settings, make_settings("x", [endpoint("a", "http://127.0.0.1:1/a", ["a.#"])])
    )
    assert (plan.added, plan.removed, plan.changed, plan.unchanged) == ((), (), (), ("a",))


def test_pausing_or_resuming_an_endpoint_replaces_its_consumer() -> None:
    """paused is part of the endpoint, so a pause or a resume changes it (its consumer is
    replaced); the others are unchanged."""
    a = endpoint("a", "http://127.0.0.1:1/a", ["a.#"])
    b = endpoint("b", "http://127.0.0.1:1/b", ["b.#"])
    paused = make_settings("x", [{**a, "paused": True}, b])
    resumed = make_settings("x", [a, b])
    for running, loaded in ((paused, resumed), (resumed, paused)):
        plan = plan_reload(running, loaded)
        assert (plan.changed, plan.unchanged) == (("a",), ("b",))


async def run_cli(*args: str) -> tuple[int, str]:
    code, out, err = await run_python("-m", "worker", *args)
    return code, out + err


@pytest.mark.slow
async def test_sighup_adds_changes_and_removes_endpoints_mid_load_losing_nothing(
    tmp_path: Path, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """Under load, SIGHUP rotates a's secret, adds b and removes c: every a event is
    delivered exactly once, b gets what was published after the reload, and every c event
    was delivered, stays queued, or is retired to the dead-letter queue; none is lost.
    An invalid config is then rejected and delivery goes on."""
    receiver.script("/a", (200, {}, 0.02))
    receiver.script("/c", (200, {}, 0.05))
    a = endpoint("a", receiver.url("/a"), ["a.#"])
    b = endpoint("b", receiver.url("/b"), ["b.#"])
    c = endpoint("c", receiver.url("/c"), ["c.#"], max_in_flight=2)
    before = make_document(exchange_name, [a, c])
    after = make_document(exchange_name, [{**a, "secret": SECRET_B}, b])
    config = write_config(tmp_path, before)
    published: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    refused: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    b_after_reload: list[str] = []
    reloaded = asyncio.Event()
    try:
        async with WorkerProcess(config) as worker:
            await worker.wait_for_log("worker_consuming")

            async def load() -> None:
                async with Publisher(AMQP_URL, exchange_name) as publisher:
                    for n in range(300):
                        for kind in ("a", "b", "c"):
                            try:
                                event_id = await publisher.publish(
                                    f"{kind}.event", {"n": n}, event_id=f"{kind}-{n}"
                                )
                            except Unroutable:
                                # The SDK says so when no endpoint subscribes: not a loss.
                                refused[kind].append(f"{kind}-{n}")
                                continue
                            published[kind].append(event_id)
                            if kind == "b" and reloaded.is_set():
                                b_after_reload.append(event_id)
                        await asyncio.sleep(0.01)

            loader = asyncio.create_task(load())
            await asyncio.sleep(1.0)
            write_config(tmp_path, after)
            worker.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            record = await worker.wait_for_log("config_reloaded")
            reloaded.set()
            assert (record["added"], record["removed"], record["changed"]) == (["b"], ["c"], ["a"])
            await loader
            await receiver.wait_for(lambda: len(set(receiver.delivered_ids("/a"))) == 300, 30)
            await receiver.wait_for(
                lambda: set(b_after_reload) <= set(receiver.delivered_ids("/b")), 30
            )

            config.write_text("endpoints: [ {name: broken")
            worker.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            rejected = await worker.wait_for_log("config_reload_rejected")
            assert "config.yaml" in rejected["error"]
            write_config(tmp_path, after)  # what the operator fixes it to
            async with Publisher(AMQP_URL, exchange_name) as publisher:
                await publisher.publish("a.event", {}, event_id="a-after-rejected")
            await receiver.wait_for(lambda: "a-after-rejected" in receiver.delivered_ids("/a"))
            assert await worker.stop() == 0

        a_deliveries = Counter(receiver.delivered_ids("/a"))
        assert set(a_deliveries) == {*published["a"], "a-after-rejected"}
        assert max(a_deliveries.values()) == 1
        first, last = receiver.on("/a")[0], receiver.on("/a")[-1]
        Webhook(SECRET_A).verify(first.body, first.headers)
        Webhook(SECRET_B).verify(last.body, last.headers)
        assert len(b_after_reload) > 50
        assert Counter(receiver.delivered_ids("/b"))[b_after_reload[-1]] == 1

        left_in_c = await broker.depth(endpoint_queue(exchange_name, "c"))
        assert left_in_c > 0, "c should have had a backlog when it was removed"
        code, out = await run_cli("dlq", "retire", "--config", str(config), "--endpoint", "c")
        assert (code, out.strip()) == (
            0,
            f"{left_in_c} moved to the dead-letter queue (reason endpoint_removed)",
        )
        retired = {
            m.message_id: m.headers for m in await broker.drain(dead_letter_queue(exchange_name))
        }
        assert {h["hookline-reason"] for h in retired.values()} == {"endpoint_removed"}
        assert set(published["c"]) <= set(receiver.delivered_ids("/c")) | set(retired)
        assert set(published["b"]) == set(receiver.delivered_ids("/b"))
        assert refused["a"] == [] and refused["b"] and refused["c"]
    finally:
        everything = make_settings(exchange_name, [a, b, c])
        await broker.delete_all(everything)


async def test_an_endpoint_that_cannot_start_on_reload_is_retried_not_fatal(
    exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """A reload whose new endpoint's queue conflicts on the broker logs
    config_reload_failed, keeps the worker and its other endpoints running, and starts the
    endpoint once the conflict is cleared."""
    old = make_document(exchange_name, [endpoint("a", receiver.url("/a"), ["a.#"])])
    late = endpoint("late", receiver.url("/late"), ["late.#"])
    new = make_document(exchange_name, [endpoint("a", receiver.url("/a"), ["a.#"]), late])
    worker = reloading_worker(old, new)
    channel = await broker.channel()
    conflicting = endpoint_queue(exchange_name, "late")
    await channel.declare_queue(conflicting, durable=True)  # classic, not quorum
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: is_ready(worker))
        with capture_logs() as logs:
            worker.request_reload()
            await eventually(lambda: was_logged(logs, "config_reload_failed"))
            await publish_events(exchange_name, 1, "a.event", "still")
            await receiver.wait_for(lambda: receiver.delivered_ids("/a") == ["still-0"])
            await channel.queue_delete(conflicting)
            await eventually(lambda: was_logged(logs, "endpoint_started"), timeout_s=20)
        await publish_events(exchange_name, 1, "late.event", "late")
        await receiver.wait_for(lambda: receiver.delivered_ids("/late") == ["late-0"])
        assert worker.is_ready()
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)
        await channel.close()
        await broker.delete_all(worker.settings)


@pytest.mark.parametrize("later", ["changed", "removed"])
async def test_a_start_retried_in_the_background_never_revives_an_older_version(
    later: str, exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """A reload adds an endpoint the broker refuses, so its start is retried in the
    background; a second reload then changes its URL, or removes it. Once the broker
    accepts, only the latest version runs: events reach the new URL, never the old one,
    and a removed endpoint is never declared or bound again."""
    a = endpoint("a", receiver.url("/a"), ["a.#"])
    old_late = endpoint("late", receiver.url("/old"), ["late.#"])
    new_late = endpoint("late", receiver.url("/new"), ["late.#"])
    worker = reloading_worker(
        make_document(exchange_name, [a]),
        make_document(exchange_name, [a, old_late]),
        make_document(exchange_name, [a, new_late] if later == "changed" else [a]),
    )
    channel = await broker.channel()
    conflicting = endpoint_queue(exchange_name, "late")
    await channel.declare_queue(conflicting, durable=True)  # classic, not quorum
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: is_ready(worker))
        with capture_logs() as logs:
            worker.request_reload()
            await eventually(lambda: was_logged(logs, "config_reload_failed"))
            worker.request_reload()
            await eventually(lambda: was_logged(logs, "config_reloaded", count=2))
            await channel.queue_delete(conflicting)
            if later == "changed":
                await eventually(lambda: was_logged(logs, "endpoint_started"), timeout_s=20)
            else:
                await asyncio.sleep(3)  # longer than the first retries' back-off
        assert not task.done()
        if later == "changed":
            await publish_events(exchange_name, 3, "late.event", "late")
            await receiver.wait_for(lambda: len(receiver.delivered_ids("/new")) == 3)
            assert receiver.on("/old") == []
        else:
            assert not await was_logged(logs, "endpoint_started")
            assert await inspect_queue(broker.connection, conflicting) is None
        assert worker.is_ready()
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)
        await channel.close()
        await broker.delete_all(make_settings(exchange_name, [a, new_late]))


async def test_endpoint_removed_counts_what_waits_in_its_legacy_delay_queues(
    exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """The endpoint_removed log line counts the events left for the endpoint that can be
    counted: its work queue and its delay queues of Hookline before 0.2 (it said 0 while
    retries waited there)."""
    gone = endpoint("gone", receiver.url("/gone"), ["gone.#"])
    keep = endpoint("keep", receiver.url("/keep"), ["keep.#"])
    worker = reloading_worker(
        make_document(exchange_name, [gone, keep]), make_document(exchange_name, [keep])
    )
    stranded = make_settings(exchange_name, [gone], retry={"delays_s": [60]})
    await strand_in_legacy_tier(broker, stranded, "gone", 60, 3)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: is_ready(worker))
        with capture_logs() as logs:
            worker.request_reload()
            await eventually(lambda: was_logged(logs, "config_reloaded"))
        [removed] = [entry for entry in logs if entry["event"] == "endpoint_removed"]
        assert removed["queued"] == 3
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)
        await broker.delete_all(stranded)
        await broker.delete_all(make_settings(exchange_name, [gone]))
        await broker.delete_all(worker.settings)


async def test_an_endpoint_removed_while_its_start_was_retried_is_unbound(
    exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """A start that failed (its queue conflicts) and is being retried; a reload then removes
    the endpoint: its patterns are unbound all the same (a failed start may have bound
    them), so events published afterwards do not pile up in its queue unseen."""
    a = endpoint("a", receiver.url("/a"), ["a.#"])
    late = endpoint("late", receiver.url("/late"), ["late.#"])
    worker = reloading_worker(
        make_document(exchange_name, [a]),
        make_document(exchange_name, [a, late]),
        make_document(exchange_name, [a]),
    )
    everything = make_settings(exchange_name, [a, late])
    channel = await broker.channel()
    conflicting = endpoint_queue(exchange_name, "late")
    await channel.declare_queue(conflicting, durable=True)  # classic: conflicts
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: is_ready(worker))
        with capture_logs() as logs:
            worker.request_reload()
            await eventually(lambda: was_logged(logs, "config_reload_failed"))
            worker.request_reload()
            await eventually(lambda: was_logged(logs, "config_reloaded", count=2))
        assert await was_logged(logs, "endpoint_removed")
        with pytest.raises(Unroutable):
            await publish_events(exchange_name, 1, "late.event", "after-removal")
        assert await broker.depth(endpoint_queue(exchange_name, "late")) == 0
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)
        await channel.queue_delete(conflicting)
        await channel.close()
        await broker.delete_all(everything)


async def test_a_paused_endpoint_receives_what_queued_once_a_reload_resumes_it(
    exchange_name: str, receiver: Receiver, broker: Broker
) -> None:
    """Events for a paused endpoint wait in its queue with nothing POSTed; a reload to
    ``paused: false`` replaces its consumer, which delivers every one of them, and what is
    published afterwards too."""
    held = endpoint("held", receiver.url("/held"), ["held.#"])
    live = endpoint("live", receiver.url("/live"), ["live.#"])
    worker = reloading_worker(
        make_document(exchange_name, [{**held, "paused": True}, live]),
        make_document(exchange_name, [held, live]),
    )
    queue = endpoint_queue(exchange_name, "held")
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: is_ready(worker))
        waiting = await publish_events(exchange_name, 5, "held.event", "waiting")
        await broker.wait_depth(queue, 5)
        await publish_events(exchange_name, 1, "live.event", "live")
        await receiver.wait_for(lambda: receiver.delivered_ids("/live") == ["live-0"])
        assert receiver.on("/held") == []
        with capture_logs() as logs:
            worker.request_reload()
            await eventually(lambda: was_logged(logs, "config_reloaded"))
        [reloaded] = [entry for entry in logs if entry["event"] == "config_reloaded"]
        assert (reloaded["changed"], reloaded["added"], reloaded["removed"]) == (["held"], [], [])
        await receiver.wait_for(lambda: sorted(receiver.delivered_ids("/held")) == waiting)
        after = await publish_events(exchange_name, 1, "held.event", "after")
        await receiver.wait_for(lambda: len(receiver.delivered_ids("/held")) == 6)
        assert sorted(receiver.delivered_ids("/held")) == sorted([*waiting, *after])
        await broker.wait_depth(queue, 0)
        assert worker._endpoints is not None
        assert not any(consumer.paused for consumer in worker._endpoints.consumers)
        assert worker.is_ready()
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)
        await broker.delete_all(worker.settings)
