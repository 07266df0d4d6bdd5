"""The worker's status as JSON, for ``/status.json``, the page at ``/`` and ``worker status``.

Only what is safe on an unauthenticated port: endpoint names and hosts (never full URLs,
which may carry tokens in their path or query), states, rates and depths.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from producer import __version__
from worker.depths import QueueDepths
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.consumer import EndpointConsumer


def build_status(
    settings: Settings,
    consumers: Sequence[EndpointConsumer],
    depths: QueueDepths,
    *,
    ready: bool,
) -> dict[str, Any]:
    endpoints = []
    for consumer in consumers:
        endpoint = consumer.endpoint
        rates = consumer.recent.rates()
        endpoints.append(
            {
                "name": endpoint.name,
                # The host as it is dialled (normalised), scheme and port: never path or query.
                "destination": str(endpoint.request_url.origin()),
                "circuit": consumer.circuit_state.label,
                "in_flight": consumer.in_flight,
                "delivered_per_s": round(rates.delivered_per_s, 3),
                "failed_per_s": round(rates.failed_per_s, 3),
                "error_ratio": round(rates.error_ratio, 4)
                if rates.error_ratio is not None
                else None,
                "backlog": depths.backlog.get(endpoint.name),
                "retry_waiting": depths.retry_waiting.get(endpoint.name),
                "rate_limit_per_s": endpoint.rate_limit_per_s,
            }
        )
    return {
        "version": __version__,
        "exchange": settings.broker.exchange,
        "ready": ready,
        "generated_at": _iso(datetime.now(UTC)),
        "depths_polled_at": (
            _iso(datetime.fromtimestamp(depths.polled_at, UTC)) if depths.polled_at else None
        ),
        "dead_letter": depths.dead_letter,
        "unrouted": depths.unrouted,
        "endpoints": endpoints,
    }


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
