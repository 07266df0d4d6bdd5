"""Which endpoints have Prometheus series of their own, and the handles consumers count with.

A worker may serve 10,000 endpoints; a dozen metrics with a series per endpoint would not
scrape. So an endpoint has series of its own (label ``endpoint="<name>"``) only while it is
*notable*:

- its circuit is not closed, or
- its config says ``metrics_detail: true``, or
- it had a failed attempt (a retry or a dead letter) in the last 5 minutes, or
- its queue held messages (backlog > 0) at its last depth poll.

At most ``metrics.max_endpoint_series`` endpoints have series of their own, chosen in that
priority order: circuit, detail, failures, then the largest backlog (so open circuits are
seen by name as long as fewer than that many are open; ``webhook_circuits`` counts them all).
Every other endpoint's
activity is counted under ``endpoint="_other"``, so ``sum()`` over the label is always the
worker's total. An endpoint that stops being notable keeps its series for a hold time of 5
minutes, so that an endpoint on the edge does not flap; then its series are removed (only
once its deliveries in flight have finished) and its activity goes to ``_other`` again.

Notability is re-evaluated once per depth-poll round (:meth:`SeriesBook.update`): it ends
holds and hands free slots to the most important notable endpoints. When none is free, a
notable endpoint takes the slot of one of a lower class (a held one first), which goes to
``_other`` at once, hold or not; never of its own class: a slightly larger backlog
elsewhere does not move series around. Between rounds, an endpoint
whose circuit leaves closed is promoted at once (taking a lower class's slot if none is
free), as are endpoints that fail or are set to ``metrics_detail`` while a slot is free.

What an endpoint's own series are: deliveries by outcome, attempts by status class, dead
letters by reason, record failures, the two histograms, in flight, rate-limit waits and
events its filter passed over (each created at zero, about 66 series with the histograms'
buckets), plus ``webhook_endpoint_circuit_state`` (absent means closed) and
``webhook_backlog_messages``.
``webhook_circuits{state}`` counts this worker's endpoints per circuit state, whatever
their series.

Consumers count through an :class:`EndpointSeries`: its children are swapped when its
endpoint's notability changes, so the hot path never calls ``.labels()``. An attempt in
flight is counted on the children current when it started, and taken off the same ones.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from worker.circuit import CircuitState
from worker.outcomes import ATTEMPT_ACTIONS, Action, Reason

if TYPE_CHECKING:
    from worker.metrics import Metrics
    from worker.settings import EndpointSettings

OTHER = "_other"  # not a possible endpoint name: those start with [a-z0-9]
HOLD_S = 300.0
FAILURE_WINDOW_S = 300.0
DEFAULT_MAX_SERIES = 200

# The reasons a delivery can dead-letter with (``dlq retire``'s endpoint_removed is not one).
DEAD_LETTER_REASONS = tuple(
    reason.value for reason in Reason if reason is not Reason.ENDPOINT_REMOVED
)


class Notability(enum.IntEnum):
    """Why an endpoint has series of its own; a lower value wins a slot."""

    # An open circuit first: it is what an operator must see by name, and the alerts on it
    # read webhook_endpoint_circuit_state.
    CIRCUIT = 0
    DETAIL = 1
    FAILURES = 2
    BACKLOG = 3
    HELD = 4  # no longer notable, within its hold time


class LabelSeries:
    """The children of every per-endpoint metric for one ``endpoint`` label value."""

    __slots__ = (
        "_metrics",
        "_on_drained",
        "active",
        "attempts",
        "backlog",
        "circuit",
        "dead_lettered",
        "deliveries",
        "duration",
        "end_to_end",
        "filtered",
        "in_flight",
        "label",
        "rate_limited",
        "record_failures",
        "retiring",
    )

    def __init__(
        self, metrics: Metrics, label: str, on_drained: Callable[[LabelSeries], None]
    ) -> None:
        self._metrics = metrics
        self._on_drained = on_drained
        self.label = label
        # Only what an attempt ends in: a filtered event was never attempted.
        self.deliveries: dict[Action, Counter] = {
            action: metrics.deliveries.labels(endpoint=label, outcome=action.value)
            for action in ATTEMPT_ACTIONS
        }
        # Created as they occur: most endpoints only ever see a class or two.
        self.attempts: dict[str, Counter] = {}
        self.dead_lettered: dict[str, Counter] = {
            reason: metrics.dead_lettered.labels(endpoint=label, reason=reason)
            for reason in DEAD_LETTER_REASONS
        }
        self.record_failures: Counter = metrics.record_failures.labels(endpoint=label)
        self.duration: Histogram = metrics.duration.labels(endpoint=label)
        self.end_to_end: Histogram = metrics.end_to_end.labels(endpoint=label)
        self.in_flight: Gauge = metrics.in_flight.labels(endpoint=label)
        self.rate_limited: Counter = metrics.rate_limited.labels(endpoint=label)
        self.filtered: Counter = metrics.filtered.labels(endpoint=label)
        # An endpoint's own state gauges, while it has series of its own.
        self.circuit: Gauge | None = None
        self.backlog: Gauge | None = None
        self.active = 0  # attempts counted on self.in_flight and not finished
        self.retiring = False  # to be removed once ``active`` is 0

    def attempt_counter(self, status_class: str) -> Counter:
        counter = self.attempts.get(status_class)
        if counter is None:
            counter = self._metrics.attempts.labels(endpoint=self.label, status_class=status_class)
            self.attempts[status_class] = counter
        return counter

    def dead_letter_counter(self, reason: str) -> Counter:
        counter = self.dead_lettered.get(reason)
        if counter is None:
            counter = self._metrics.dead_lettered.labels(endpoint=self.label, reason=reason)
            self.dead_lettered[reason] = counter
        return counter

    def end_attempt(self) -> None:
        """The attempt started with :meth:`EndpointSeries.start_attempt` has finished."""
        self.in_flight.dec()
        self.active -= 1
        if self.retiring and self.active == 0:
            self._on_drained(self)

    def show_state(self, circuit: CircuitState, backlog: int) -> None:
        self.circuit = self._metrics.circuit_state.labels(endpoint=self.label)
        self.circuit.set(circuit.value)
        self.backlog = self._metrics.backlog.labels(endpoint=self.label)
        self.backlog.set(backlog)

    def hide_state(self) -> None:
        """Removed at once when the endpoint goes to ``_other``: its backlog is summed there
        from then on, and an absent circuit state reads as closed."""
        self._metrics.circuit_state.remove(self.label)
        self._metrics.backlog.remove(self.label)
        self.circuit = self.backlog = None

    def remove(self) -> None:
        metrics, label = self._metrics, self.label
        for action in ATTEMPT_ACTIONS:
            metrics.deliveries.remove(label, action.value)
        for status_class in self.attempts:
            metrics.attempts.remove(label, status_class)
        for reason in self.dead_lettered:
            metrics.dead_lettered.remove(label, reason)
        for metric in (
            metrics.record_failures,
            metrics.duration,
            metrics.end_to_end,
            metrics.in_flight,
            metrics.rate_limited,
            metrics.filtered,
        ):
            metric.remove(label)


class EndpointSeries:
    """What a consumer counts its endpoint's activity with. Cheap on the hot path: a dict
    lookup and an increment; the book swaps ``_series`` between rounds."""

    __slots__ = (
        "_book",
        "_series",
        "backlog",
        "circuit",
        "detail",
        "failed_at",
        "forgotten",
        "name",
        "notable_at",
    )

    def __init__(self, book: SeriesBook, name: str, detail: bool, series: LabelSeries) -> None:
        self._book = book
        self._series = series
        self.name = name
        self.detail = detail
        self.circuit = CircuitState.CLOSED
        self.backlog = 0  # at its last depth poll
        self.failed_at: float | None = None  # clock of its last failed attempt
        self.notable_at = 0.0  # clock when it was last seen notable with series of its own
        self.forgotten = False

    @property
    def own(self) -> bool:
        """Whether it has series of its own (else it counts under ``_other``)."""
        return self._series.label == self.name

    def start_attempt(self) -> LabelSeries:
        """Count an attempt in flight; call ``end_attempt()`` on what this returns (not on
        the handle, whose children may have changed meanwhile)."""
        series = self._series
        series.active += 1
        series.in_flight.inc()
        return series

    def count_attempt(self, status_class: str) -> None:
        self._series.attempt_counter(status_class).inc()

    def observe_duration(self, seconds: float) -> None:
        self._series.duration.observe(seconds)

    def count_outcome(self, action: Action) -> None:
        """An attempt's outcome (one of ``ATTEMPT_ACTIONS``)."""
        self._series.deliveries[action].inc()

    def observe_end_to_end(self, seconds: float) -> None:
        self._series.end_to_end.observe(seconds)

    def count_dead_letter(self, reason: str) -> None:
        self._series.dead_letter_counter(reason).inc()

    def count_record_failure(self) -> None:
        self._series.record_failures.inc()

    def count_rate_limited(self) -> None:
        self._series.rate_limited.inc()

    def count_filtered(self) -> None:
        """An event acknowledged without a request: it did not match the endpoint's filter.
        Not an attempt, and nothing that makes the endpoint notable."""
        self._series.filtered.inc()

    def set_circuit(self, state: CircuitState) -> None:
        self._book.circuit_changed(self, state)

    def failed(self) -> None:
        """An attempt failed (it will be retried or dead-lettered): notable for a while."""
        self._book.failed(self)


class SeriesBook:
    """Every endpoint's :class:`EndpointSeries`, and which of them have series of their own."""

    def __init__(
        self,
        metrics: Metrics,
        max_series: int = DEFAULT_MAX_SERIES,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self.max_series = max_series
        self._clock = clock
        self._endpoints: dict[str, EndpointSeries] = {}
        self._own: dict[str, EndpointSeries] = {}
        # Children of endpoints gone to _other, waiting for their attempts in flight.
        self._draining: dict[str, LabelSeries] = {}
        self._other = LabelSeries(metrics, OTHER, self._drained)
        self._other_backlog = 0
        self._other_backlog_gauge = metrics.backlog.labels(endpoint=OTHER)
        self._circuits = dict.fromkeys(CircuitState, 0)
        self._circuit_gauges = {
            state: metrics.circuits.labels(state=state.label) for state in CircuitState
        }

    def __iter__(self) -> Iterator[EndpointSeries]:
        return iter(self._endpoints.values())

    def __len__(self) -> int:
        return len(self._endpoints)

    def own(self) -> list[str]:
        """Names of the endpoints with series of their own."""
        return list(self._own)

    def register(self, endpoint: EndpointSettings) -> EndpointSeries:
        """The endpoint's handle; the same one again for a name already registered (a
        replaced consumer and its successor share it), with ``metrics_detail`` updated."""
        handle = self._endpoints.get(endpoint.name)
        if handle is None:
            handle = EndpointSeries(self, endpoint.name, endpoint.metrics_detail, self._other)
            self._endpoints[endpoint.name] = handle
            self._count_circuit(handle.circuit, 1)
        handle.detail = endpoint.metrics_detail
        if handle.detail:
            self._promote_now(handle, Notability.DETAIL, take_lower=True)
        return handle

    def forget(self, name: str) -> None:
        """A removed endpoint: its series go (once its attempts in flight have finished) and
        it is no longer counted. Its handle keeps working, counting under ``_other``."""
        handle = self._endpoints.pop(name, None)
        if handle is None:
            return
        handle.forgotten = True
        self._count_circuit(handle.circuit, -1)
        if handle.own:
            self._release(handle)
        else:
            self._set_other_backlog(self._other_backlog - handle.backlog)
        handle.backlog = 0

    def update(self, backlog: Mapping[str, int], *, max_series: int | None = None) -> None:
        """Once per depth-poll round: take the backlogs seen (an endpoint missing from
        ``backlog`` keeps its last one), end holds, give slots to notable endpoints."""
        if max_series is not None:
            self.max_series = max_series
        now = self._clock()
        for name, count in backlog.items():
            handle = self._endpoints.get(name)
            if handle is not None:
                handle.backlog = count
        members: list[tuple[tuple[int, int, str], EndpointSeries]] = []
        for handle in list(self._own.values()):
            notability = self._notability(handle, now)
            if notability is not None:
                handle.notable_at = now
            elif now - handle.notable_at >= HOLD_S:
                self._release(handle)
                continue
            members.append((self._rank(handle, notability), handle))
        waiting = []
        for handle in self._endpoints.values():
            if not handle.own and (notability := self._notability(handle, now)) is not None:
                waiting.append((self._rank(handle, notability), handle))
        waiting.sort()
        # Worst first: a lower max_series (a restart with a new config) sheds these.
        members.sort(reverse=True)
        while members and len(self._own) > self.max_series:
            self._release(members.pop(0)[1])
        for rank, handle in waiting:
            if len(self._own) < self.max_series:
                self._promote(handle, now)
            elif members and members[0][0][0] > rank[0]:
                self._release(members.pop(0)[1])
                self._promote(handle, now)
            else:
                break  # ``waiting`` is sorted: no later one outranks a member either
        for handle in self._own.values():
            if handle._series.backlog is not None:
                handle._series.backlog.set(handle.backlog)
        # Endpoints polled but not registered (a start being retried) count too: the sum
        # over the label is what KEDA scales on.
        self._set_other_backlog(
            sum(handle.backlog for handle in self._endpoints.values() if not handle.own)
            + sum(count for name, count in backlog.items() if name not in self._endpoints)
        )

    def circuit_changed(self, handle: EndpointSeries, state: CircuitState) -> None:
        previous, handle.circuit = handle.circuit, state
        if handle.forgotten:
            return
        self._count_circuit(previous, -1)
        self._count_circuit(state, 1)
        circuit = handle._series.circuit
        if handle.own and circuit is not None:
            circuit.set(state.value)
        elif state is not CircuitState.CLOSED:
            self._promote_now(handle, Notability.CIRCUIT, take_lower=True)

    def failed(self, handle: EndpointSeries) -> None:
        handle.failed_at = self._clock()
        if not handle.own:
            # Only into a free slot: this runs per failed message, so it must not scan the
            # members; the next round ranks it against them.
            self._promote_now(handle, Notability.FAILURES, take_lower=False)

    def _notability(self, handle: EndpointSeries, now: float) -> Notability | None:
        if handle.circuit is not CircuitState.CLOSED:
            return Notability.CIRCUIT
        if handle.detail:
            return Notability.DETAIL
        if handle.failed_at is not None and now - handle.failed_at < FAILURE_WINDOW_S:
            return Notability.FAILURES
        if handle.backlog > 0:
            return Notability.BACKLOG
        return None

    @staticmethod
    def _rank(handle: EndpointSeries, notability: Notability | None) -> tuple[int, int, str]:
        """Sorts best first: class, then larger backlog, then name."""
        return (
            Notability.HELD if notability is None else notability,
            -handle.backlog,
            handle.name,
        )

    def _promote_now(
        self, handle: EndpointSeries, notability: Notability, take_lower: bool
    ) -> None:
        if handle.own or handle.forgotten:
            return
        now = self._clock()
        if len(self._own) < self.max_series:
            self._promote(handle, now)
            return
        if not take_lower or not self._own:
            return
        rank, worst = max(
            (
                (self._rank(member, self._notability(member, now)), member)
                for member in self._own.values()
            ),
            key=lambda ranked: ranked[0],
        )
        if rank[0] > notability:
            self._release(worst)
            self._promote(handle, now)

    def _promote(self, handle: EndpointSeries, now: float) -> None:
        series = self._draining.pop(handle.name, None)
        if series is None:
            series = LabelSeries(self._metrics, handle.name, self._drained)
        # A series still draining is taken back: creating it anew would hand out the very
        # same children (prometheus_client keeps them by label), which the drain removes.
        series.retiring = False
        series.show_state(handle.circuit, handle.backlog)
        handle._series = series
        handle.notable_at = now
        self._own[handle.name] = handle
        self._set_other_backlog(self._other_backlog - handle.backlog)

    def _release(self, handle: EndpointSeries) -> None:
        series, handle._series = handle._series, self._other
        del self._own[handle.name]
        series.hide_state()
        if not handle.forgotten:
            self._set_other_backlog(self._other_backlog + handle.backlog)
        if series.active:
            series.retiring = True
            self._draining[handle.name] = series
        else:
            series.remove()

    def _drained(self, series: LabelSeries) -> None:
        if self._draining.get(series.label) is series:
            del self._draining[series.label]
        series.retiring = False
        series.remove()

    def _set_other_backlog(self, value: int) -> None:
        self._other_backlog = value
        self._other_backlog_gauge.set(value)

    def _count_circuit(self, state: CircuitState, change: int) -> None:
        self._circuits[state] += change
        self._circuit_gauges[state].set(self._circuits[state])
