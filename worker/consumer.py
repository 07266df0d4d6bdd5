"""Consuming one endpoint's queue: parse, attempt, decide, record, then ack.

The consumer also applies the endpoint's rate limit and acts on its circuit breaker: it
cancels its subscription while the circuit is open and subscribes with a prefetch of one
while it is half-open.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from prometheus_client import Counter

from producer.envelope import Envelope, parse_envelope
from producer.headers import attempts_made
from worker.acks import AckCoalescer
from worker.circuit import CircuitBreaker, CircuitState, Transition
from worker.delivery import EndpointClient
from worker.exceptions import InvalidEnvelope, PublishError
from worker.metrics import Metrics
from worker.opsevents import OperationalEvents
from worker.outcomes import Action, AttemptResult, Decision, ErrorKind, Reason
from worker.ratelimit import TokenBucket
from worker.recent import RecentOutcomes
from worker.recorder import Recorder, settle
from worker.retry import decide
from worker.settings import EndpointSettings, Settings
from worker.topology import declare_endpoint

# After an outcome could not be recorded, wait before requeueing, so that a broker in
# trouble (alarm, failover) is not met with a tight redeliver-and-POST loop.
RECORD_FAILURE_PAUSE_S = 1.0
RESUBSCRIBE_FIRST_DELAY_S = 1.0
RESUBSCRIBE_MAX_DELAY_S = 30.0

OUTCOME_EVENTS = {
    Action.ACK: "delivery_succeeded",
    Action.RETRY: "delivery_retry_scheduled",
    Action.DEAD_LETTER: "delivery_dead_lettered",
}


def prefetch_for(settings: Settings, endpoint: EndpointSettings) -> int:
    """``max_in_flight``, but no more than ten seconds' worth of a rate-limited endpoint's
    events: more would only wait in this worker's memory, unavailable to other workers,
    and risk the broker's consumer timeout on a slow limit."""
    prefetch = settings.max_in_flight_for(endpoint)
    if endpoint.rate_limit_per_s is not None:
        prefetch = min(prefetch, max(1, math.ceil(endpoint.rate_limit_per_s * 10)))
    return prefetch


class EndpointConsumer:
    """One endpoint's consumer on its own channel: its prefetch bounds its concurrency."""

    def __init__(
        self,
        *,
        settings: Settings,
        endpoint: EndpointSettings,
        channel: AbstractChannel,
        client: EndpointClient,
        recorder: Recorder,
        metrics: Metrics,
        operational_events: OperationalEvents,
    ) -> None:
        self._settings = settings
        self.endpoint = endpoint
        self._channel = channel
        self._client = client
        self._recorder = recorder
        self._metrics = metrics
        self._operational_events = operational_events
        self._log = structlog.get_logger("hookline.delivery").bind(endpoint=endpoint.name)
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._started = False
        # Set once stopping; also wakes messages waiting for a rate-limit token.
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Circuit changes and cool-down timers; kept so that shutdown can cancel them.
        self._control_tasks: set[asyncio.Task[None]] = set()
        self._subscription_lock = asyncio.Lock()
        self._prefetch = prefetch_for(settings, endpoint)
        breaker = settings.circuit_breaker
        self.breaker = CircuitBreaker(breaker) if breaker.enabled else None
        self._circuit_state = metrics.circuit_state.labels(endpoint=endpoint.name)
        self._circuit_state.set(CircuitState.CLOSED.value)
        self._rate_limit = (
            TokenBucket(endpoint.rate_limit_per_s) if endpoint.rate_limit_per_s else None
        )
        self._rate_limited = metrics.rate_limited.labels(endpoint=endpoint.name)
        self.recent = RecentOutcomes()
        self._acks = AckCoalescer()
        self._in_flight = metrics.in_flight.labels(endpoint=endpoint.name)
        self._duration = metrics.duration.labels(endpoint=endpoint.name)
        self._end_to_end = metrics.end_to_end.labels(endpoint=endpoint.name)
        # Labelled children looked up once: .labels() takes a lock on every call.
        self._outcomes = {
            action: metrics.deliveries.labels(endpoint=endpoint.name, outcome=action.value)
            for action in Action
        }
        self._status_classes: dict[str, Counter] = {}

    @property
    def running(self) -> bool:
        """Started and not stopping; an open circuit is a running consumer's choice."""
        return self._started and not self._stopped.is_set()

    @property
    def circuit_state(self) -> CircuitState:
        return self.breaker.state if self.breaker is not None else CircuitState.CLOSED

    @property
    def queue(self) -> AbstractQueue | None:
        return self._queue

    @property
    def in_flight_tasks(self) -> set[asyncio.Task[Any]]:
        return set(self._tasks)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        # Declared on this channel so the robust channel re-declares it after a reconnect.
        self._queue = await declare_endpoint(self._channel, self._settings, self.endpoint)
        await self._subscribe(self._prefetch)
        self._started = True

    async def stop_consuming(self) -> None:
        """Stop taking new messages; any that still arrive go back to the queue."""
        self._stopped.set()
        for task in self._control_tasks:
            task.cancel()
        await asyncio.gather(*self._control_tasks, return_exceptions=True)
        await self._unsubscribe()

    async def _subscribe(self, prefetch: int) -> None:
        assert self._queue is not None
        # basic.qos applies to consumers started after it, hence always before consume.
        await self._channel.set_qos(prefetch_count=prefetch)
        self._consumer_tag = await self._queue.consume(self._on_message)

    async def _resubscribe(self, prefetch: int) -> None:
        """Subscribe after a circuit change, retrying while the broker connection is down:
        a failure here must not leave the endpoint without a consumer for good."""
        delay_s = RESUBSCRIBE_FIRST_DELAY_S
        while not self._stopped.is_set():
            try:
                await self._subscribe(prefetch)
                return
            except Exception as exc:  # noqa: BLE001 - broker trouble; the robust connection returns
                self._log.warning("consumer_subscribe_failed", error=exc.__class__.__name__,
                                  retry_in_s=delay_s)  # fmt: skip
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RESUBSCRIBE_MAX_DELAY_S)

    async def _unsubscribe(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        if self._queue is not None and tag is not None:
            try:
                await self._queue.cancel(tag)
            except Exception as exc:  # noqa: BLE001 - broker may already be gone; nothing to cancel
                self._log.warning("consumer_cancel_failed", error=exc.__class__.__name__)

    async def _take_token(self) -> bool:
        """Wait for the rate limit; False if the consumer stopped or the circuit opened
        meanwhile, so a message waiting for its turn goes back to the queue at once."""
        assert self._rate_limit is not None
        token = asyncio.ensure_future(self._rate_limit.acquire())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({token, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not token.done():
                token.cancel()
        if token.cancelled():
            return False
        if token.result():
            self._rate_limited.inc()
        return not self._holding_back()

    def _holding_back(self) -> bool:
        return self._stopped.is_set() or self.circuit_state is CircuitState.OPEN

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acks.started(message)
        if self._holding_back():
            # Prefetched before the consumer was cancelled: back to the queue, unattempted.
            await self._requeue(message)
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(message)
        except Exception:  # noqa: BLE001 - logged with its traceback; the worker must live
            # A bug, not an endpoint failure: keep the message and keep the worker alive.
            self._log.exception("delivery_handler_crashed", message_id=message.message_id)
            await asyncio.sleep(RECORD_FAILURE_PAUSE_S)
            await self._requeue(message)
        finally:
            self._tasks.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        attempt = attempts_made(message.headers) + 1
        log = self._log.bind(attempt=attempt)
        envelope: Envelope | None = None
        try:
            envelope = parse_envelope(message.body, self._settings.delivery.max_body_bytes)
        except InvalidEnvelope as exc:
            result = AttemptResult(detail=str(exc))
            decision = Decision(Action.DEAD_LETTER, reason=Reason.INVALID_ENVELOPE)
            log = log.bind(message_id=message.message_id)
        else:
            log = log.bind(event_id=envelope.id, event_type=envelope.type)
            if self._rate_limit is not None and not await self._take_token():
                await self._requeue(message)
                return
            result = await self._attempt(envelope, message.body)
            decision = decide(result, attempt, self._settings.retry)
        try:
            await self._record(message, decision, result, attempt)
        except PublishError as exc:
            self._metrics.record_failures.labels(endpoint=self.endpoint.name).inc()
            log.warning(
                "delivery_outcome_not_recorded",
                status=result.last_status,
                error=str(exc),
                requeue_after_s=RECORD_FAILURE_PAUSE_S,
            )
            await asyncio.sleep(RECORD_FAILURE_PAUSE_S)
            await self._requeue(message)
            return
        self._observe(decision, result, envelope, log)
        if decision.action is Action.DEAD_LETTER:
            assert decision.reason is not None
            self._operational_events.event_dead_lettered(
                self.endpoint.name,
                event_id=envelope.id if envelope is not None else message.message_id,
                event_type=envelope.type if envelope is not None else None,
                reason=decision.reason.value,
                attempts=attempt,
                last_status=result.last_status,
            )
        if envelope is not None:
            self._count(result)

    def _count(self, result: AttemptResult) -> None:
        """Feed one attempt's result to the recent rates and the circuit breaker."""
        self.recent.record(result.delivered)
        if self.breaker is None:
            return
        transition = self.breaker.record(not result.endpoint_unavailable)
        if transition is not None:
            self._control(self._on_transition(transition, result.last_status))

    def _control(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._control_tasks.add(task)
        task.add_done_callback(self._control_tasks.discard)

    async def _on_transition(self, transition: Transition, last_status: str) -> None:
        async with self._subscription_lock:
            if self._stopped.is_set():
                return
            self._circuit_state.set(transition.new.value)
            if transition.new is CircuitState.OPEN:
                await self._unsubscribe()
                self._log.warning(
                    "circuit_opened",
                    previous_state=transition.old.label,
                    consecutive_failures=transition.consecutive_failures,
                    last_status=last_status,
                    cooldown_s=transition.cooldown_s,
                )
                if transition.old is CircuitState.CLOSED:
                    self._operational_events.endpoint_failing(
                        self.endpoint.name,
                        consecutive_failures=transition.consecutive_failures,
                        last_status=last_status,
                        cooldown_s=transition.cooldown_s,
                    )
                self._control(self._probe_after(transition.cooldown_s))
            elif transition.new is CircuitState.CLOSED:
                await self._unsubscribe()
                await self._resubscribe(self._prefetch)
                outage_s = round(transition.outage_s or 0.0, 3)
                self._log.info("circuit_closed", outage_s=outage_s)
                self._operational_events.endpoint_recovered(
                    self.endpoint.name, outage_s=transition.outage_s
                )

    async def _probe_after(self, cooldown_s: float) -> None:
        await asyncio.sleep(cooldown_s)
        async with self._subscription_lock:
            if self._stopped.is_set() or self.breaker is None:
                return
            transition = self.breaker.half_open()
            self._circuit_state.set(transition.new.value)
            self._log.info("circuit_half_open", cooldown_s=cooldown_s)
            await self._resubscribe(1)

    async def _attempt(self, envelope: Envelope, body: bytes) -> AttemptResult:
        self._in_flight.inc()
        try:
            result = await self._client.attempt(envelope.id, body)
        finally:
            self._in_flight.dec()
        if result.error is not ErrorKind.BLOCKED_DESTINATION:
            self._duration.observe(result.duration_s)
        counter = self._status_classes.get(result.status_class)
        if counter is None:
            counter = self._metrics.attempts.labels(
                endpoint=self.endpoint.name, status_class=result.status_class
            )
            self._status_classes[result.status_class] = counter
        counter.inc()
        return result

    async def _record(
        self,
        message: AbstractIncomingMessage,
        decision: Decision,
        result: AttemptResult,
        attempt: int,
    ) -> None:
        if decision.action is Action.RETRY:
            assert decision.delay_s is not None
            await self._recorder.schedule_retry(
                message,
                self.endpoint.name,
                attempts=attempt,
                handler_errors=0,
                delay_s=decision.delay_s,
            )
        elif decision.action is Action.DEAD_LETTER:
            assert decision.reason is not None
            await self._recorder.dead_letter(
                message,
                endpoint=self.endpoint.name,
                reason=decision.reason,
                attempts=attempt if decision.reason is not Reason.INVALID_ENVELOPE else attempt - 1,
                last_status=result.last_status,
                detail=result.detail,
            )
        if not await self._acks.ack(message):
            self._log.warning("ack_failed_will_be_redelivered", message_id=message.message_id)

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        await settle(message, requeue=True)
        self._acks.forget(message)

    def _observe(
        self,
        decision: Decision,
        result: AttemptResult,
        envelope: Envelope | None,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._outcomes[decision.action].inc()
        fields = {
            "status": result.last_status,
            "duration_ms": round(result.duration_s * 1000, 1),
            "outcome": decision.action.value,
        }
        if decision.action is Action.ACK:
            assert envelope is not None
            self._end_to_end.observe(
                max(0.0, (datetime.now(UTC) - envelope.timestamp).total_seconds())
            )
            log.info(OUTCOME_EVENTS[decision.action], **fields)
            return
        fields["detail"] = result.detail
        if result.error is not None:
            fields["error"] = result.error
        if decision.action is Action.RETRY:
            fields["next_delay_s"] = decision.delay_s
        else:
            assert decision.reason is not None
            fields["reason"] = decision.reason.value
            self._metrics.dead_lettered.labels(
                endpoint=self.endpoint.name, reason=decision.reason.value
            ).inc()
        log.warning(OUTCOME_EVENTS[decision.action], **fields)
