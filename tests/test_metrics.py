"""The metrics module: series that exist at zero before the first event."""

from __future__ import annotations

from prometheus_client import generate_latest

from worker.metrics import DEAD_LETTER_REASONS, Metrics
from worker.outcomes import Reason


def test_every_delivery_dead_letter_reason_is_precreated() -> None:
    """register_endpoint creates a zero dead-letter series for every reason a delivery can
    end with, so alerts and dashboards see rates before the first dead letter."""
    assert set(DEAD_LETTER_REASONS) == {reason.value for reason in Reason} - {"endpoint_removed"}
    metrics = Metrics()
    metrics.register_endpoint("billing")
    text = generate_latest(metrics.registry).decode()
    for reason in DEAD_LETTER_REASONS:
        assert f'webhook_dead_lettered_total{{endpoint="billing",reason="{reason}"}} 0.0' in text
    assert 'webhook_endpoint_circuit_state{endpoint="billing"} 0.0' in text


def test_forget_endpoint_drops_its_gauges() -> None:
    """A removed endpoint's depth and state gauges disappear; its counters stay."""
    metrics = Metrics()
    metrics.register_endpoint("old")
    metrics.backlog.labels(endpoint="old").set(5)
    metrics.forget_endpoint("old")
    text = generate_latest(metrics.registry).decode()
    assert 'webhook_backlog_messages{endpoint="old"}' not in text
    assert 'webhook_endpoint_circuit_state{endpoint="old"}' not in text
    assert 'webhook_deliveries_total{endpoint="old",outcome="delivered"}' in text
