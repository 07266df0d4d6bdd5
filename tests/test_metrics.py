"""The metrics module: series that exist at zero before the first event."""

from __future__ import annotations

from prometheus_client import generate_latest

from tests.conftest import endpoint, make_settings
from worker.metrics import DEAD_LETTER_REASONS, Metrics
from worker.outcomes import Reason
from worker.series import OTHER


def test_every_delivery_dead_letter_reason_is_precreated() -> None:
    """An endpoint with series of its own, and _other, get a zero dead-letter series for
    every reason a delivery can end with, so alerts and dashboards see rates before the
    first dead letter; a quiet endpoint gets none of its own."""
    assert set(DEAD_LETTER_REASONS) == {reason.value for reason in Reason} - {"endpoint_removed"}
    metrics = Metrics()
    billing, quiet = make_settings(
        "hl-metrics",
        [
            endpoint("billing", "http://127.0.0.1/b", ["#"], metrics_detail=True),
            endpoint("quiet", "http://127.0.0.1/q", ["#"]),
        ],
    ).endpoints
    metrics.series.register(billing)
    metrics.series.register(quiet)
    text = generate_latest(metrics.registry).decode()
    for label in ("billing", OTHER):
        for reason in DEAD_LETTER_REASONS:
            line = f'webhook_dead_lettered_total{{endpoint="{label}",reason="{reason}"}} 0.0'
            assert line in text
    assert 'webhook_endpoint_circuit_state{endpoint="billing"} 0.0' in text
    assert 'endpoint="quiet"' not in text
    assert 'webhook_circuits{state="closed"} 2.0' in text


def test_forget_endpoint_drops_its_series() -> None:
    """A removed endpoint's series disappear (its past activity stays in Prometheus);
    _other's remain."""
    metrics = Metrics()
    [billing] = make_settings(
        "hl-metrics", [endpoint("billing", "http://127.0.0.1/b", ["#"], metrics_detail=True)]
    ).endpoints
    metrics.series.register(billing)
    metrics.series.update({"billing": 5})
    assert (
        'webhook_backlog_messages{endpoint="billing"} 5.0'
        in generate_latest(metrics.registry).decode()
    )
    metrics.forget_endpoint("billing")
    text = generate_latest(metrics.registry).decode()
    assert 'endpoint="billing"' not in text
    assert f'webhook_deliveries_total{{endpoint="{OTHER}",outcome="delivered"}}' in text
    assert 'webhook_circuits{state="closed"} 0.0' in text
