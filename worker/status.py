"""The worker's status as JSON, for ``/status.json``, the page at ``/`` and ``worker status``.

Only what is safe on an unauthenticated port: endpoint names, tenants and hosts (never full
URLs, which may carry tokens in their path or query), states, rates and depths.

It stays small at 10,000 endpoints: totals over every endpoint, then at most
:data:`MAX_ENDPOINTS_SHOWN` endpoints, those needing attention first (circuit not closed,
then most failures per second, then largest backlog, then by name). Every endpoint whose
circuit is not closed is listed as long as there are no more of them than that.

With a tenant (``/status.json?tenant=T``), only that tenant's endpoints count: the cap
applies to them, and the endpoint totals and rates are theirs. Dead letters, unrouted
events and retries waiting are the exchange's, shared by every tenant, and stay as they are.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from producer import __version__
from worker.circuit import CircuitState
from worker.depths import QueueDepths
from worker.recent import RecentRates
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.consumer import EndpointConsumer

MAX_ENDPOINTS_SHOWN = 1000


def build_status(
    settings: Settings,
    consumers: Sequence[EndpointConsumer],
    depths: QueueDepths,
    *,
    ready: bool,
    max_shown: int = MAX_ENDPOINTS_SHOWN,
    tenant: str | None = None,
) -> dict[str, Any]:
    """The status document; ``tenant`` keeps only that tenant's endpoints."""
    configured = settings.endpoints
    if tenant is not None:
        consumers = [consumer for consumer in consumers if consumer.endpoint.tenant == tenant]
        configured = tuple(endpoint for endpoint in configured if endpoint.tenant == tenant)
    rated = [(consumer, consumer.recent.rates()) for consumer in consumers]

    def attention(entry: tuple[EndpointConsumer, RecentRates]) -> tuple[bool, float, int, str]:
        consumer, rates = entry
        return (
            consumer.circuit_state is CircuitState.CLOSED,
            -rates.failed_per_s,
            -depths.backlog.get(consumer.endpoint.name, 0),
            consumer.endpoint.name,
        )

    shown = heapq.nsmallest(max_shown, rated, key=attention)
    return {
        "version": __version__,
        "exchange": settings.broker.exchange,
        "ready": ready,
        # The filter this document was built with (None: every endpoint).
        "tenant": tenant,
        "generated_at": _iso(datetime.now(UTC)),
        "depths_polled_at": (
            _iso(datetime.fromtimestamp(depths.polled_at, UTC)) if depths.polled_at else None
        ),
        "dead_letter": depths.dead_letter,
        "unrouted": depths.unrouted,
        "endpoints_total": len(configured),
        "endpoints_shown": len(shown),
        "endpoints_paused": sum(endpoint.paused for endpoint in configured),
        "delivered_per_s": round(sum(rates.delivered_per_s for _, rates in rated), 3),
        "failed_per_s": round(sum(rates.failed_per_s for _, rates in rated), 3),
        "circuits_not_closed": sum(
            consumer.circuit_state is not CircuitState.CLOSED for consumer in consumers
        ),
        "retry_waiting": depths.retry_waiting,
        "retry_waiting_by_delay": dict(depths.retry_waiting_by_delay),
        "endpoints": [_endpoint(consumer, rates, depths) for consumer, rates in shown],
    }


def _endpoint(
    consumer: EndpointConsumer, rates: RecentRates, depths: QueueDepths
) -> dict[str, Any]:
    endpoint = consumer.endpoint
    return {
        "name": endpoint.name,
        "tenant": endpoint.tenant,
        # The host as it is dialled (normalised), scheme and port: never path or query.
        "destination": str(endpoint.request_url.origin()),
        "circuit": consumer.circuit_state.label,
        # Paused: events queue up and nothing is attempted; the circuit keeps its state.
        "paused": endpoint.paused,
        "in_flight": consumer.in_flight,
        "delivered_per_s": round(rates.delivered_per_s, 3),
        "failed_per_s": round(rates.failed_per_s, 3),
        "error_ratio": round(rates.error_ratio, 4) if rates.error_ratio is not None else None,
        # None until the poller's turns reached it (a share of the endpoints per round).
        "backlog": depths.backlog.get(endpoint.name),
        "rate_limit_per_s": endpoint.rate_limit_per_s,
    }


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
