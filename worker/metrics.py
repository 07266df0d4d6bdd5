"""Every Prometheus metric the worker exports. Labels come only from small fixed sets:
endpoint names (from the config, and only as many as ``metrics.max_endpoint_series``: see
:mod:`worker.series`), outcomes, reasons, status classes, circuit states and delay tiers;
never URLs or ids."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from producer import __version__
from worker.series import DEAD_LETTER_REASONS, DEFAULT_MAX_SERIES, SeriesBook

__all__ = ["DEAD_LETTER_REASONS", "Metrics"]
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
END_TO_END_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
    10800,
    43200,
    86400,
)


@dataclass(frozen=True, slots=True)
class RegistryGauges:
    """Exported only by workers that follow a registry: a worker without one has no
    registry to be disconnected from, and an alert on ``== 0`` must not fire for it."""

    connected: Gauge
    endpoints: Gauge
    invalid: Gauge
    last_sync: Gauge


class Metrics:
    """One set of metrics on its own registry, so several workers can share a process."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_endpoint_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.deliveries = Counter(
            "webhook_deliveries",
            "Delivery attempts by what was done with the message afterwards.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.attempts = Counter(
            "webhook_attempts",
            "Delivery attempts by HTTP status class or error class.",
            ["endpoint", "status_class"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "webhook_dead_lettered",
            "Messages moved to the dead-letter queue, by reason.",
            ["endpoint", "reason"],
            registry=r,
        )
        self.record_failures = Counter(
            "webhook_record_failures",
            "Outcomes that could not be recorded (republish not confirmed); message requeued.",
            ["endpoint"],
            registry=r,
        )
        self.duration = Histogram(
            "webhook_delivery_duration_seconds",
            "Time of one HTTP attempt.",
            ["endpoint"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.end_to_end = Histogram(
            "webhook_end_to_end_seconds",
            "From the event's first publish (its hookline-published-at header, which the SDK "
            "sets; else its first attempt) to its successful delivery.",
            ["endpoint"],
            buckets=END_TO_END_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            "webhook_in_flight",
            "Deliveries in progress.",
            ["endpoint"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "webhook_endpoint_circuit_state",
            "This worker's circuit breaker for the endpoint: 0 closed, 1 open, 2 half-open "
            "(only endpoints with series of their own; absent means closed).",
            ["endpoint"],
            registry=r,
        )
        self.circuits = Gauge(
            "webhook_circuits",
            "This worker's endpoints by the state of their circuit breaker.",
            ["state"],
            registry=r,
        )
        self.rate_limited = Counter(
            "webhook_rate_limit_waits",
            "Attempts that waited for the endpoint's rate limit.",
            ["endpoint"],
            registry=r,
        )
        self.filtered = Counter(
            "webhook_filtered",
            "Events acknowledged without a request because they did not match the endpoint's "
            "filter.",
            ["endpoint"],
            registry=r,
        )
        self.broker_connected = Gauge(
            "webhook_broker_connected",
            "1 while the worker's broker connections are up.",
            registry=r,
        )
        self.broker_reconnects = Counter(
            "webhook_broker_reconnects",
            "Broker connections re-established after a loss.",
            registry=r,
        )
        self.ready = Gauge(
            "webhook_worker_ready",
            "1 while the worker is connected and consuming.",
            registry=r,
        )
        self._registry_gauges: RegistryGauges | None = None
        self.backlog = Gauge(
            "webhook_backlog_messages",
            "Messages ready in an endpoint's queue (polled from the broker, a share of the "
            "endpoint queues per round); endpoints without series of their own are summed "
            'as endpoint="_other".',
            ["endpoint"],
            registry=r,
        )
        self.retry_waiting = Gauge(
            "webhook_retry_waiting_messages",
            "Messages waiting for a retry in a delay tier shared by every endpoint "
            "(polled from the broker).",
            ["tier"],
            registry=r,
        )
        self.dead_letter_depth = Gauge(
            "webhook_dead_letter_messages",
            "Messages in the dead-letter queue and its overflow queue (polled from the broker).",
            registry=r,
        )
        self.unrouted_depth = Gauge(
            "webhook_unrouted_messages",
            "Events that matched no endpoint, kept in the bounded unrouted queue (polled).",
            registry=r,
        )
        self.info = Gauge(
            "webhook_worker_info",
            "Constant 1, labelled with the Hookline version.",
            ["version"],
            registry=r,
        )
        self.info.labels(version=__version__).set(1)
        # Which endpoints have series of their own; consumers count through its handles.
        self.series = SeriesBook(self, max_endpoint_series)

    def forget_endpoint(self, endpoint: str) -> None:
        """A removed endpoint: see :meth:`SeriesBook.forget`."""
        self.series.forget(endpoint)

    def registry_gauges(self) -> RegistryGauges:
        """The registry's gauges, registered on first use."""
        if self._registry_gauges is None:
            self._registry_gauges = RegistryGauges(
                connected=Gauge(
                    "webhook_registry_connected",
                    "1 while the worker follows the endpoint registry (PostgreSQL); 0 while "
                    "it delivers with the endpoints it last read.",
                    registry=self.registry,
                ),
                endpoints=Gauge(
                    "webhook_registry_endpoints",
                    "Endpoints the worker has from the registry.",
                    registry=self.registry,
                ),
                invalid=Gauge(
                    "webhook_registry_invalid_endpoints",
                    "Registry rows this worker cannot use (not delivered until fixed; the "
                    "registry_endpoint_invalid log line says why).",
                    registry=self.registry,
                ),
                last_sync=Gauge(
                    "webhook_registry_last_sync_timestamp_seconds",
                    "When the worker last read the registry (Unix time).",
                    registry=self.registry,
                ),
            )
        return self._registry_gauges
