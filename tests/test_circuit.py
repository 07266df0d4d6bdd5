"""The circuit breaker: its state machine, and a real worker pausing and resuming an endpoint."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from tests.conftest import Broker, Receiver, RunWorker, endpoint, make_settings, publish_events
from worker.circuit import CircuitBreaker, CircuitState
from worker.outcomes import AttemptResult, ErrorKind
from worker.settings import CircuitBreakerSettings
from worker.topology import endpoint_queue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(threshold: int = 3, cooldown_s: float = 1, max_cooldown_s: float = 3) -> CircuitBreaker:
    settings = CircuitBreakerSettings(
        failure_threshold=threshold, cooldown_s=cooldown_s, max_cooldown_s=max_cooldown_s
    )
    return CircuitBreaker(settings, clock=Clock())


def test_opens_after_threshold_consecutive_failures_only() -> None:
    """A success resets the count; the threshold-th failure in a row opens the circuit."""
    circuit = breaker(threshold=3)
    assert circuit.record(False) is None
    assert circuit.record(False) is None
    assert circuit.record(True) is None
    assert circuit.record(False) is None
    assert circuit.record(False) is None
    opened = circuit.record(False)
    assert opened is not None
    assert (opened.old, opened.new, opened.consecutive_failures) == (
        CircuitState.CLOSED,
        CircuitState.OPEN,
        3,
    )


def test_results_while_open_are_ignored() -> None:
    """Attempts already in flight when it opened change nothing."""
    circuit = breaker(threshold=1)
    circuit.record(False)
    assert circuit.record(True) is None
    assert circuit.record(False) is None
    assert circuit.state is CircuitState.OPEN


def test_failed_probes_double_the_cooldown_up_to_the_maximum() -> None:
    """Each failed probe re-opens with twice the cool-down, capped at max_cooldown_s."""
    circuit = breaker(threshold=1, cooldown_s=1, max_cooldown_s=3)
    cooldowns = [circuit.record(False).cooldown_s]  # type: ignore[union-attr]
    for _ in range(3):
        circuit.half_open()
        reopened = circuit.record(False)
        assert reopened is not None and reopened.old is CircuitState.HALF_OPEN
        cooldowns.append(reopened.cooldown_s)
    assert cooldowns == [1, 2, 3, 3]


def test_successful_probe_closes_and_resets() -> None:
    """A delivered probe closes the circuit, reports the outage and resets the cool-down."""
    clock = Clock()
    circuit = CircuitBreaker(
        CircuitBreakerSettings(failure_threshold=1, cooldown_s=1, max_cooldown_s=8), clock=clock
    )
    circuit.record(False)
    circuit.half_open()
    circuit.record(False)
    clock.now += 7
    circuit.half_open()
    closed = circuit.record(True)
    assert closed is not None and closed.new is CircuitState.CLOSED
    assert closed.outage_s == pytest.approx(7)
    assert (circuit.cooldown_s, circuit.consecutive_failures) == (1, 0)


def circuit_metric(text: bytes, endpoint_name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(f'webhook_endpoint_circuit_state{{endpoint="{endpoint_name}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no circuit state series")


async def test_open_circuit_holds_events_without_spending_attempts(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """After 3 failures the worker stops taking the endpoint's events; they wait in its queue
    unattempted; a probe after the cool-down that succeeds resumes delivery of all of them."""
    settings = make_settings(
        exchange_name,
        [endpoint("flaky", receiver.url("/flaky"), ["flaky.#"], max_in_flight=1)],
        circuit_breaker={"enabled": True, "failure_threshold": 3, "cooldown_s": 1.5},
        retry={"delays_s": [30]},
    )
    receiver.script("/flaky", 503)
    with capture_logs() as logs:
        worker = await run_worker(settings)
        ids = await publish_events(exchange_name, 20, "flaky.event", "cb")
        await receiver.wait_for(lambda: len(receiver.on("/flaky")) == 3)
        await asyncio.sleep(0.8)  # well inside the cool-down
        assert len(receiver.on("/flaky")) == 3
        assert circuit_metric(generate_latest(worker.metrics.registry), "flaky") == 1
        assert await broker.depth(endpoint_queue(exchange_name, "flaky")) == 17
        receiver.script("/flaky", 200)
        await receiver.wait_for(lambda: len(receiver.delivered_ids("/flaky")) == 17, 15)
    assert circuit_metric(generate_latest(worker.metrics.registry), "flaky") == 0
    attempts = Counter(r.headers["webhook-id"] for r in receiver.on("/flaky"))
    # The 3 that failed wait out their 30 s retry; the 17 held back were attempted once.
    assert sorted(receiver.delivered_ids("/flaky")) == sorted(ids[3:])
    assert all(attempts[event_id] == 1 for event_id in ids[3:])
    changes = [entry["event"] for entry in logs if entry["event"].startswith("circuit_")]
    assert changes == ["circuit_opened", "circuit_half_open", "circuit_closed"]


async def test_failed_probes_reopen_with_growing_cooldown(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """While the endpoint stays down, one probe per cool-down reaches it, each later than
    the last, and the events spend one attempt per probe only."""
    settings = make_settings(
        exchange_name,
        [endpoint("down", receiver.url("/down"), ["down.#"], max_in_flight=1)],
        circuit_breaker={
            "enabled": True,
            "failure_threshold": 2,
            "cooldown_s": 0.4,
            "max_cooldown_s": 1.6,
        },
        retry={"delays_s": [60]},
    )
    receiver.script("/down", 500)
    with capture_logs() as logs:
        await run_worker(settings)
        await publish_events(exchange_name, 30, "down.event", "probe")
        await receiver.wait_for(lambda: len(receiver.on("/down")) >= 2)
        await asyncio.sleep(4.6)
    arrivals = [r.at for r in receiver.on("/down")]
    probes = arrivals[2:]
    # Cool-downs 0.4, 0.8, 1.6, 1.6 s: three or four probes fit in 4.6 s, never more.
    assert 3 <= len(probes) <= 4, arrivals
    gaps = [later - earlier for earlier, later in itertools.pairwise(probes)]
    assert gaps[0] >= 0.75 and all(gap >= 1.5 for gap in gaps[1:]), gaps
    reopened = [e["cooldown_s"] for e in logs if e["event"] == "circuit_opened"]
    assert reopened[:4] == [0.4, 0.8, 1.6, 1.6][: len(reopened[:4])]
    assert len(reopened) >= 3


def test_only_unavailability_counts_against_the_circuit() -> None:
    """5xx, 408, 429 and network errors count; a 4xx refusal, a refused destination or
    Hookline's own failure does not."""
    unavailable = [
        AttemptResult(status=503),
        AttemptResult(status=429),
        AttemptResult(status=408),
        AttemptResult(error=ErrorKind.TIMEOUT),
        AttemptResult(error=ErrorKind.CONNECTION_ERROR),
        AttemptResult(error=ErrorKind.TLS_ERROR),
    ]
    available = [
        AttemptResult(status=200),
        AttemptResult(status=400),
        AttemptResult(status=410),
        AttemptResult(error=ErrorKind.HANDLER_ERROR),
        AttemptResult(error=ErrorKind.BLOCKED_DESTINATION),
    ]
    assert all(result.endpoint_unavailable for result in unavailable)
    assert not any(result.endpoint_unavailable for result in available)
