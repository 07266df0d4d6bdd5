"""Bounded per-endpoint series: which endpoints have series of their own, ``_other``, the
hold, removal after in-flight attempts drain, and the size of /metrics at 3,000 endpoints.

Driven through :class:`SeriesBook` directly, with a clock the test moves: no broker."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest

from tests.conftest import endpoint, make_settings
from worker.circuit import CircuitState
from worker.metrics import Metrics
from worker.outcomes import Action
from worker.series import FAILURE_WINDOW_S, HOLD_S, OTHER, EndpointSeries, SeriesBook
from worker.settings import EndpointSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoints(count: int, **extra: Any) -> list[EndpointSettings]:
    settings = make_settings(
        "hl-series",
        [endpoint(f"e{n:05d}", "http://127.0.0.1/hook", ["#"], **extra) for n in range(count)],
    )
    return list(settings.endpoints)


def book(max_series: int, clock: Clock) -> tuple[Metrics, SeriesBook]:
    metrics = Metrics(max_endpoint_series=max_series)
    metrics.series = SeriesBook(metrics, max_series, clock=clock)
    return metrics, metrics.series


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def delivered(metrics: Metrics, label: str) -> float | None:
    return value(metrics, "webhook_deliveries_total", endpoint=label, outcome="delivered")


def deliver(handle: EndpointSeries) -> None:
    """What a consumer counts for one successful delivery."""
    in_flight = handle.start_attempt()
    in_flight.end_attempt()
    handle.observe_duration(0.01)
    handle.count_attempt("2xx")
    handle.count_outcome(Action.ACK)
    handle.observe_end_to_end(0.02)


def test_at_most_max_series_endpoints_and_the_rest_under_other() -> None:
    """With more notable endpoints than the cap, the largest backlogs get series of their
    own; the others' activity and backlog are summed under endpoint="_other", so sums over
    the label are the worker's totals."""
    metrics, series = book(3, Clock())
    handles = [series.register(each) for each in endpoints(10)]
    backlog = {handle.name: n * 10 for n, handle in enumerate(handles)}  # e00000 has none
    series.update(backlog)
    assert sorted(series.own()) == ["e00007", "e00008", "e00009"]
    for handle in handles:
        deliver(handle)
    assert delivered(metrics, "e00009") == 1
    assert delivered(metrics, "e00001") is None
    assert delivered(metrics, OTHER) == 7
    assert value(metrics, "webhook_backlog_messages", endpoint="e00008") == 80
    assert value(metrics, "webhook_backlog_messages", endpoint=OTHER) == sum(range(0, 70, 10))
    total = sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "webhook_backlog_messages"
        for sample in family.samples
    )
    assert total == sum(backlog.values())
    assert value(metrics, "webhook_in_flight", endpoint=OTHER) == 0


def test_slots_go_by_circuit_then_detail_then_failures_then_backlog() -> None:
    """An open circuit outranks metrics_detail, which outranks recent failures, which
    outrank a backlog; a circuit that opens takes the slot of a lower class at once, while
    a larger backlog never moves an endpoint of its own class out."""
    clock = Clock()
    metrics, series = book(3, clock)
    detail, circuit, failing, queued, other = endpoints(5)
    handles = {
        each.name: series.register(each)
        for each in (detail.model_copy(update={"metrics_detail": True}), circuit, failing, queued)
    }
    handles[circuit.name].set_circuit(CircuitState.OPEN)
    handles[failing.name].failed()
    series.update({queued.name: 500})
    assert sorted(series.own()) == [detail.name, circuit.name, failing.name]
    late = series.register(other)
    late.set_circuit(CircuitState.HALF_OPEN)  # outranks the failing endpoint: at once
    assert sorted(series.own()) == [detail.name, circuit.name, other.name]
    assert value(metrics, "webhook_endpoint_circuit_state", endpoint=other.name) == 2
    assert value(metrics, "webhook_endpoint_circuit_state", endpoint=failing.name) is None
    series.update({queued.name: 5000})
    assert queued.name not in series.own()


def test_failure_gives_series_at_once_while_a_slot_is_free() -> None:
    """A failed attempt promotes its endpoint without waiting for a round, so the failure
    itself is counted under the endpoint's name; with no slot free it waits for a round."""
    clock = Clock()
    metrics, series = book(1, clock)
    first, second = (series.register(each) for each in endpoints(2))
    first.failed()
    first.count_attempt("5xx")
    assert first.own
    assert value(metrics, "webhook_attempts_total", endpoint=first.name, status_class="5xx") == 1
    second.failed()
    second.count_attempt("5xx")
    assert not second.own
    assert value(metrics, "webhook_attempts_total", endpoint=OTHER, status_class="5xx") == 1


def test_series_are_held_for_five_minutes_after_notability_ends() -> None:
    """An endpoint whose backlog drained keeps its series for the hold time, then they are
    removed and its activity counts under _other again."""
    clock = Clock()
    metrics, series = book(5, clock)
    [handle] = (series.register(each) for each in endpoints(1))
    series.update({handle.name: 4})
    deliver(handle)
    series.update({handle.name: 0})
    clock.now += HOLD_S - 1
    series.update({})
    assert handle.own and delivered(metrics, handle.name) == 1
    assert value(metrics, "webhook_backlog_messages", endpoint=handle.name) == 0
    clock.now += 1
    series.update({})
    assert not handle.own
    text = generate_latest(metrics.registry).decode()
    assert f'endpoint="{handle.name}"' not in text
    deliver(handle)
    assert delivered(metrics, OTHER) == 1


def test_a_failure_is_notable_for_five_minutes_then_held() -> None:
    """A failed attempt keeps series for FAILURE_WINDOW_S, and the hold follows."""
    clock = Clock()
    _, series = book(5, clock)
    [handle] = (series.register(each) for each in endpoints(1))
    handle.failed()
    clock.now += FAILURE_WINDOW_S - 1
    series.update({})
    clock.now += HOLD_S - 1
    series.update({})
    assert handle.own
    clock.now += 2
    series.update({})
    assert not handle.own


def test_a_notable_endpoint_takes_a_held_ones_slot() -> None:
    """A held endpoint is no longer notable: any notable endpoint waiting takes its slot."""
    clock = Clock()
    _, series = book(1, clock)
    held, waiting = (series.register(each) for each in endpoints(2))
    series.update({held.name: 1})
    series.update({held.name: 0, waiting.name: 1})
    assert series.own() == [waiting.name]


def test_series_are_removed_only_after_in_flight_attempts_finish() -> None:
    """Attempts in flight when an endpoint goes to _other are taken off its own in_flight
    child, which is removed with the rest of its series only then; meanwhile new activity
    counts under _other. A removed endpoint (forget) drains the same way."""
    clock = Clock()
    metrics, series = book(5, clock)
    kept, removed = (series.register(each) for each in endpoints(2))
    series.update({kept.name: 1, removed.name: 1})
    slow = kept.start_attempt()
    gone = removed.start_attempt()
    series.forget(removed.name)
    clock.now += HOLD_S
    series.update({kept.name: 0})
    assert not kept.own
    assert value(metrics, "webhook_in_flight", endpoint=kept.name) == 1
    assert value(metrics, "webhook_in_flight", endpoint=removed.name) == 1
    assert value(metrics, "webhook_backlog_messages", endpoint=kept.name) is None
    deliver(kept)
    assert delivered(metrics, OTHER) == 1
    assert value(metrics, "webhook_in_flight", endpoint=OTHER) == 0
    slow.end_attempt()
    gone.end_attempt()
    text = generate_latest(metrics.registry).decode()
    assert f'endpoint="{kept.name}"' not in text
    assert f'endpoint="{removed.name}"' not in text
    assert value(metrics, "webhook_in_flight", endpoint=OTHER) == 0


def test_an_endpoint_notable_again_while_draining_keeps_its_series() -> None:
    """Promoted again before its last attempt finished, an endpoint takes its draining
    series back: the end of that attempt must not remove the series now in use."""
    clock = Clock()
    metrics, series = book(5, clock)
    [handle] = (series.register(each) for each in endpoints(1))
    series.update({handle.name: 1})
    deliver(handle)
    in_flight = handle.start_attempt()
    clock.now += HOLD_S
    series.update({handle.name: 0})
    series.update({handle.name: 2})
    in_flight.end_attempt()
    assert handle.own
    assert delivered(metrics, handle.name) == 1
    assert value(metrics, "webhook_in_flight", endpoint=handle.name) == 0


def test_circuits_are_counted_per_state_and_shown_per_endpoint_only_with_own_series() -> None:
    """webhook_circuits counts every endpoint by state; webhook_endpoint_circuit_state
    exists only for endpoints with series of their own (absent reads as closed)."""
    metrics, series = book(1, Clock())
    first, second, third = (series.register(each) for each in endpoints(3))
    first.set_circuit(CircuitState.OPEN)
    second.set_circuit(CircuitState.OPEN)
    second.set_circuit(CircuitState.HALF_OPEN)
    counts = {
        state.label: value(metrics, "webhook_circuits", state=state.label) for state in CircuitState
    }
    assert counts == {"closed": 1, "open": 1, "half_open": 1}
    assert value(metrics, "webhook_endpoint_circuit_state", endpoint=first.name) == 1
    assert value(metrics, "webhook_endpoint_circuit_state", endpoint=second.name) is None
    assert value(metrics, "webhook_endpoint_circuit_state", endpoint=third.name) is None
    series.forget(first.name)
    assert value(metrics, "webhook_circuits", state="open") == 0
    assert len(series) == 2


def test_register_again_returns_the_shared_handle() -> None:
    """A replaced consumer and its successor count through one handle, and an endpoint set
    to metrics_detail gets series of its own at once."""
    _, series = book(5, Clock())
    [settings] = endpoints(1)
    first = series.register(settings)
    again = series.register(settings.model_copy(update={"metrics_detail": True}))
    assert again is first and first.own and len(series) == 1


def test_metrics_stay_bounded_with_3000_endpoints() -> None:
    """3,000 endpoints, every one notable and active (failing, backlogged, some circuits
    open), with the default cap: /metrics keeps to 200 endpoints' series plus _other, well
    under 20,000 series."""
    clock = Clock()
    metrics = Metrics()
    metrics.series = SeriesBook(metrics, clock=clock)
    handles = [metrics.series.register(each) for each in endpoints(3000)]
    for n, handle in enumerate(handles):
        if n % 10 == 0:
            handle.set_circuit(CircuitState.OPEN)
        handle.failed()
        for status_class in ("2xx", "4xx", "5xx", "timeout", "connection_error"):
            handle.count_attempt(status_class)
        deliver(handle)
        handle.count_dead_letter("attempts_exhausted")
        handle.count_rate_limited()
        handle.count_record_failure()
    metrics.series.update({handle.name: 5 for handle in handles})
    for handle in handles:
        deliver(handle)
    samples = sum(len(family.samples) for family in metrics.registry.collect())
    labels = {
        sample.labels["endpoint"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if "endpoint" in sample.labels
    }
    assert len(metrics.series.own()) == 200
    assert len(labels) == 201 and OTHER in labels
    assert samples <= 20_000, samples
    assert len(generate_latest(metrics.registry).splitlines()) <= 25_000


def test_open_circuits_take_the_slots_of_detail_endpoints() -> None:
    """With every slot held by metrics_detail endpoints, a circuit that opens still gets
    series of its own (the alerts read webhook_endpoint_circuit_state by endpoint), taking a
    detail endpoint's slot."""
    clock = Clock()
    metrics, series = book(2, clock)
    first, second, failing = endpoints(3)
    for each in (first, second):
        series.register(each.model_copy(update={"metrics_detail": True}))
    handle = series.register(failing)
    handle.set_circuit(CircuitState.OPEN)
    assert failing.name in series.own()
    assert value(metrics, "webhook_endpoint_circuit_state", endpoint=failing.name) == 1
    assert len(series.own()) == 2
