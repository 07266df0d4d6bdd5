"""Consuming one endpoint's queue: parse, filter, attempt, decide, record, then ack.

An event that does not match the endpoint's filter (:mod:`worker.filters`) is acked at once,
before any rate-limit token or request: nothing is recorded on the broker, and it counts
neither as an attempt nor against the circuit. A paused endpoint's consumer declares and
binds its queue, so events keep queueing, but does not subscribe to it.

The consumer also applies the endpoint's rate limit and acts on its circuit breaker: it
cancels its subscription while the circuit is open and subscribes with a prefetch of one
while it is half-open.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from producer import headers
from producer.envelope import Envelope, parse_envelope
from worker.channels import ConsumeChannel
from worker.circuit import CircuitBreaker, CircuitState, Transition
from worker.delivery import EndpointClient
from worker.exceptions import InvalidEnvelope, PublishError
from worker.metrics import Metrics
from worker.opsevents import OperationalEvents
from worker.outcomes import FILTERED, Action, AttemptResult, Decision, ErrorKind, Reason
from worker.ratelimit import TokenBucket
from worker.recent import RecentOutcomes
from worker.recorder import Recorder, settle
from worker.retry import decide
from worker.settings import EndpointSettings, Settings
from worker.topology import Probe, declare_endpoint

# After an outcome could not be recorded, wait before requeueing, so that a broker in
# trouble (alarm, failover) is not met with a tight redeliver-and-POST loop.
RECORD_FAILURE_PAUSE_S = 1.0
RESUBSCRIBE_FIRST_DELAY_S = 1.0
# How long a message to be given back waits for its consumer's cancel to complete.
UNSUBSCRIBE_WAIT_S = 5.0
RESUBSCRIBE_MAX_DELAY_S = 30.0

OUTCOME_EVENTS = {
    Action.ACK: "delivery_succeeded",
    Action.RETRY: "delivery_retry_scheduled",
    Action.DEAD_LETTER: "delivery_dead_lettered",
    Action.FILTER: "delivery_filtered",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one message, and what it rests on."""

    decision: Decision
    attempts: int  # attempts made, this one included: what ``hookline-attempts`` records
    handler_errors: int  # the worker's own failures on it, this one included
    last_status: str  # "none" when nothing was attempted
    detail: str
    result: AttemptResult | None = None  # None when nothing was attempted


def prefetch_for(settings: Settings, endpoint: EndpointSettings) -> int:
    """``max_in_flight``, but no more than ten seconds' worth of a rate-limited endpoint's
    events: more would only wait in this worker's memory, unavailable to other workers,
    and risk the broker's consumer timeout on a slow limit."""
    prefetch = settings.max_in_flight_for(endpoint)
    if endpoint.rate_limit_per_s is not None:
        prefetch = min(prefetch, max(1, math.ceil(endpoint.rate_limit_per_s * 10)))
    return prefetch


class EndpointConsumer:
    """One endpoint's consumer: its prefetch bounds its concurrency, on a channel of its own
    or shared with other endpoints' consumers (:mod:`worker.channels`)."""

    def __init__(
        self,
        *,
        settings: Settings,
        endpoint: EndpointSettings,
        channel: ConsumeChannel,
        probe: Probe,
        client: EndpointClient,
        recorder: Recorder,
        metrics: Metrics,
        operational_events: OperationalEvents,
    ) -> None:
        self._settings = settings
        self.endpoint = endpoint
        self._channel = channel
        self._probe = probe
        self._client = client
        self._recorder = recorder
        self._operational_events = operational_events
        self._log = structlog.get_logger("hookline.delivery").bind(endpoint=endpoint.name)
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._started = False
        self._stopped = asyncio.Event()
        # Set while messages waiting for a rate-limit token must go back to the queue:
        # once stopping, and while the circuit is open.
        self._give_way = asyncio.Event()
        # Set while no subscription is active; see _give_back.
        self._unsubscribed = asyncio.Event()
        self._unsubscribed.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Messages (by id) whose ack or nack is under way or sent: a channel closes on a
        # second settle of one delivery tag, and with it every consumer sharing it.
        self._settling: set[int] = set()
        # Cancels of our subscription still waiting for the broker; see _unsubscribe.
        self._cancels: set[asyncio.Task[Any]] = set()
        # Circuit changes and cool-down timers; kept so that shutdown can cancel them.
        self._control_tasks: set[asyncio.Task[None]] = set()
        self._subscription_lock = asyncio.Lock()
        self._prefetch = prefetch_for(settings, endpoint)
        breaker = settings.circuit_breaker
        self.breaker = CircuitBreaker(breaker) if breaker.enabled else None
        # Shared with a consumer this one replaces; its children follow the endpoint's
        # notability (worker.series), so nothing here calls .labels().
        self._series = metrics.series.register(endpoint)
        self._series.set_circuit(CircuitState.CLOSED)
        self._rate_limit = (
            TokenBucket(endpoint.rate_limit_per_s) if endpoint.rate_limit_per_s else None
        )
        self.recent = RecentOutcomes()
        self._acks = channel.acks
        self._filter = endpoint.filter

    @property
    def running(self) -> bool:
        """Started and not stopping; an open circuit is a running consumer's choice."""
        return self._started and not self._stopped.is_set()

    @property
    def paused(self) -> bool:
        """Paused by its config: its queue is declared and bound, so events wait there,
        but nothing is consumed. Resuming is a config change, which replaces the consumer."""
        return self.endpoint.paused

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
        # Declared on this channel so the robust channel re-declares it after a reconnect;
        # tried on the probe first, so a refusal cannot close a channel others share.
        self._queue = await declare_endpoint(
            self._channel.channel, self._settings, self.endpoint, self._probe
        )
        if self.paused:
            # Running all the same: a pause is the config's choice, not a fault.
            self._log.info("consumer_paused")
        else:
            await self._subscribe(self._prefetch)
        self._started = True

    async def stop_consuming(self) -> None:
        """Stop taking new messages; any that still arrive go back to the queue."""
        self._stopped.set()
        self._give_way.set()
        for task in self._control_tasks:
            task.cancel()
        await asyncio.gather(*self._control_tasks, return_exceptions=True)
        await self._unsubscribe()

    async def _subscribe(self, prefetch: int) -> None:
        assert self._queue is not None
        self._unsubscribed.clear()
        # Chosen here and stored before the RPC: a consume interrupted mid-way (stop during
        # a circuit change) may still have started on the broker, and must be cancellable.
        self._consumer_tag = f"hookline.{self.endpoint.name}.{uuid.uuid4().hex[:12]}"
        await self._channel.consume(
            self._queue, self._on_message, prefetch=prefetch, consumer_tag=self._consumer_tag
        )

    async def _resubscribe(self, prefetch: int) -> None:
        """Subscribe after a circuit change, retrying while the broker connection is down:
        a failure here must not leave the endpoint without a consumer for good."""
        delay_s = RESUBSCRIBE_FIRST_DELAY_S
        while not self._stopped.is_set():
            try:
                await self._subscribe(prefetch)
                return
            except Exception as exc:  # noqa: BLE001 - broker trouble; the robust connection returns
                self._log.warning(
                    "consumer_subscribe_failed", error=exc.__class__.__name__, retry_in_s=delay_s
                )
                await self._unsubscribe()
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RESUBSCRIBE_MAX_DELAY_S)

    async def _unsubscribe(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        if self._queue is not None and tag is not None:
            # Never cancelled half-way: aiormq closes a channel whose RPC is cancelled, and
            # the channel may be shared. Waited for within a bound (with the broker away, a
            # robust queue waits for the reconnect first; it forgets the consumer before
            # that wait, so a reconnect never restores it), then left to finish.
            cancel = asyncio.ensure_future(self._queue.cancel(tag))
            self._cancels.add(cancel)
            cancel.add_done_callback(self._cancels.discard)
            try:
                await asyncio.wait_for(asyncio.shield(cancel), timeout=UNSUBSCRIBE_WAIT_S)
            except Exception as exc:  # noqa: BLE001 - the channel is gone, or will be
                self._log.warning("consumer_cancel_failed", error=exc.__class__.__name__)
        self._unsubscribed.set()

    async def _take_token(self) -> bool:
        """Wait for the rate limit; False if the consumer stopped or the circuit opened
        meanwhile, so a message waiting for its turn goes back to the queue at once."""
        assert self._rate_limit is not None
        token = asyncio.ensure_future(self._rate_limit.acquire())
        give_way = asyncio.ensure_future(self._give_way.wait())
        try:
            await asyncio.wait({token, give_way}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            give_way.cancel()
            if not token.done():
                token.cancel()
                # A cancelled task is done only once it has run its cancellation.
                await asyncio.wait({token})
        if token.cancelled():
            return False
        if token.result():
            self._series.count_rate_limited()
        return not self._holding_back()

    def _holding_back(self) -> bool:
        return self._stopped.is_set() or self.circuit_state is CircuitState.OPEN

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            self._acks.started(message)
            if self._holding_back():
                # Prefetched before the consumer was cancelled: back to the queue, unattempted.
                await self._give_back(message)
                return
            await self._handle(message)
        except asyncio.CancelledError:
            # Drained past its bound (a replaced consumer, a shutdown): back to the queue
            # now, unless its ack is already on its way. Left unsettled, it would stay on
            # the channel until the broker's consumer timeout, holding back every ack of
            # the consumers that share it.
            if self._claim(message):
                await asyncio.shield(self._requeue(message))
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: _handle settles every outcome
            # Reached only if settling itself failed unexpectedly; the message was not
            # acked, so it goes back (or is redelivered when its channel closes).
            self._log.error("delivery_settle_failed", error=exc.__class__.__name__, exc_info=exc)
            if self._claim(message):
                await self._requeue(message)
        finally:
            self._settling.discard(id(message))
            self._tasks.discard(task)

    def _claim(self, message: AbstractIncomingMessage) -> bool:
        """True for the one caller that may ack or nack ``message``."""
        if id(message) in self._settling:
            return False
        self._settling.add(id(message))
        return True

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        await settle(message, requeue=True)
        self._acks.forget(message)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        """Decide, record, ack, observe. Every message ends in exactly one of: acked after
        its outcome is recorded, or given back to the queue unacked (the worker is stopping,
        the circuit opened, or the broker could not record the outcome)."""
        attempts_before = headers.attempts_made(message.headers)
        handler_errors = headers.read_count(message.headers, headers.HANDLER_ERRORS)
        log = self._log.bind(attempt=attempts_before + 1)
        envelope: Envelope | None = None
        try:
            envelope = self._parse(message)
        except InvalidEnvelope as exc:
            log = log.bind(message_id=message.message_id)
            outcome: Outcome | None = Outcome(
                Decision(Action.DEAD_LETTER, reason=Reason.INVALID_ENVELOPE),
                attempts=attempts_before,
                handler_errors=handler_errors,
                last_status="none",
                detail=str(exc),
            )
        except Exception as exc:  # noqa: BLE001 - Hookline's own failure; bounded below
            outcome = self._crashed(exc, attempts_before + 1, handler_errors, log)
        else:
            log = log.bind(event_id=envelope.id, event_type=envelope.type)
            try:
                outcome = await self._deliver(
                    message, envelope, attempts_before + 1, handler_errors
                )
            except Exception as exc:  # noqa: BLE001 - Hookline's own failure; bounded below
                outcome = self._crashed(exc, attempts_before + 1, handler_errors, log)
        if outcome is None:
            await self._give_back(message)
            return
        recorded = await self._record(message, outcome, log)
        if recorded is not None:
            try:
                self._observe(recorded, envelope, message, log)
            except Exception:
                log.exception("delivery_observe_failed")

    def _parse(self, message: AbstractIncomingMessage) -> Envelope:
        envelope = parse_envelope(message.body, self._settings.delivery.max_body_bytes)
        # Through the exchange, the routing key chose the endpoints: a type that differs
        # from it would reach endpoints that never subscribed to that type. Retries and
        # replays arrive through the default exchange, addressed to this queue.
        if message.exchange == self._settings.broker.exchange and (
            message.routing_key != envelope.type
        ):
            raise InvalidEnvelope("type differs from the routing key it was published with")
        return envelope

    async def _deliver(
        self,
        message: AbstractIncomingMessage,
        envelope: Envelope,
        attempt: int,
        handler_errors: int,
    ) -> Outcome | None:
        """The filter, then one attempt and its decision; None when the message must go
        back unattempted."""
        if self._filter is not None and not self._filter.matches(envelope):
            # Before any token or request: acked as it is, and not an attempt.
            return Outcome(
                FILTERED,
                attempts=attempt - 1,
                handler_errors=handler_errors,
                last_status="none",
                detail="",
            )
        if self._rate_limit is not None and not await self._take_token():
            return None
        result = await self._attempt(envelope, message.body)
        return Outcome(
            decide(result, attempt, self._settings.retry),
            attempts=attempt,
            handler_errors=handler_errors,
            last_status=result.last_status,
            detail=result.detail,
            result=result,
        )

    def _crashed(
        self,
        exc: Exception,
        attempt: int,
        handler_errors: int,
        log: structlog.typing.FilteringBoundLogger,
    ) -> Outcome:
        """A bug in Hookline while handling the message: counted as a failed attempt, so the
        message goes round the retry schedule and ends dead-lettered (``handler_error``)
        instead of being requeued for ever. Not counted against the endpoint's circuit."""
        log.error("delivery_handler_crashed", error=exc.__class__.__name__, exc_info=exc)
        result = AttemptResult(
            error=ErrorKind.HANDLER_ERROR, detail=f"worker failed: {exc.__class__.__name__}"
        )
        return Outcome(
            decide(result, attempt, self._settings.retry, handler_errors + 1),
            attempts=attempt,
            handler_errors=handler_errors + 1,
            last_status=result.last_status,
            detail=result.detail,
            result=result,
        )

    def _count(self, result: AttemptResult) -> None:
        """Feed one attempt's result to the recent rates and the circuit breaker."""
        self.recent.record(result.delivered)
        if self.breaker is None:
            return
        transition = self.breaker.record(not result.endpoint_unavailable)
        if transition is not None:
            if transition.new is CircuitState.OPEN:
                # Messages waiting for a rate-limit token go back to the queue now, not
                # when their token comes.
                self._give_way.set()
            self._control(self._on_transition(transition, result.last_status))

    def _control(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._control_tasks.add(task)
        task.add_done_callback(self._control_tasks.discard)

    async def _on_transition(self, transition: Transition, last_status: str) -> None:
        async with self._subscription_lock:
            if self._stopped.is_set():
                return
            self._series.set_circuit(transition.new)
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
                self._give_way.clear()
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
            self._give_way.clear()
            self._series.set_circuit(transition.new)
            self._log.info("circuit_half_open", cooldown_s=cooldown_s)
            await self._resubscribe(1)

    async def _attempt(self, envelope: Envelope, body: bytes) -> AttemptResult:
        # Captured: the endpoint may move to or from _other before the attempt ends.
        in_flight = self._series.start_attempt()
        try:
            result = await self._client.attempt(envelope.id, body)
        finally:
            in_flight.end_attempt()
        if not result.delivered:
            # Before counting, so that an endpoint this failure gives series of its own
            # counts it there.
            self._series.failed()
        if result.error is not ErrorKind.BLOCKED_DESTINATION:
            self._series.observe_duration(result.duration_s)
        self._series.count_attempt(result.status_class)
        return result

    async def _record(
        self,
        message: AbstractIncomingMessage,
        outcome: Outcome,
        log: structlog.typing.FilteringBoundLogger,
    ) -> Outcome | None:
        """Store the outcome (a retry or dead-letter copy, confirmed), then ack; returns what
        was recorded, or None when the message went back to the queue unacked."""
        try:
            await self._write(message, outcome)
        except PublishError as exc:
            await self._not_recorded(message, outcome, log, error=str(exc))
            return None
        except Exception as exc:
            log.error("delivery_outcome_not_recorded", error=exc.__class__.__name__, exc_info=exc)
            # Last resort that depends on nothing the publisher sent but the body.
            outcome = Outcome(
                Decision(Action.DEAD_LETTER, reason=Reason.HANDLER_ERROR),
                attempts=outcome.attempts,
                handler_errors=outcome.handler_errors + 1,
                last_status=outcome.last_status,
                detail=f"worker could not copy the message: {exc.__class__.__name__}",
                result=outcome.result,
            )
            try:
                await self._write(message, outcome, bare=True)
            except Exception as last:  # noqa: BLE001 - the broker decides; retried on redelivery
                await self._not_recorded(message, outcome, log, error=last.__class__.__name__)
                return None
        self._claim(message)
        if not await self._acks.ack(message):
            log.warning("ack_failed_will_be_redelivered", message_id=message.message_id)
        return outcome

    async def _write(
        self, message: AbstractIncomingMessage, outcome: Outcome, *, bare: bool = False
    ) -> None:
        decision = outcome.decision
        if decision.action in (Action.ACK, Action.FILTER):
            return  # the ack is the whole record
        if decision.action is Action.RETRY:
            assert decision.delay_s is not None
            await self._recorder.schedule_retry(
                message,
                self.endpoint.name,
                attempts=outcome.attempts,
                handler_errors=outcome.handler_errors,
                delay_s=decision.delay_s,
            )
        elif decision.action is Action.DEAD_LETTER:
            assert decision.reason is not None
            await self._recorder.dead_letter(
                message,
                endpoint=self.endpoint.name,
                reason=decision.reason,
                attempts=outcome.attempts,
                last_status=outcome.last_status,
                detail=outcome.detail,
                handler_errors=outcome.handler_errors,
                bare=bare,
            )

    async def _not_recorded(
        self,
        message: AbstractIncomingMessage,
        outcome: Outcome,
        log: structlog.typing.FilteringBoundLogger,
        *,
        error: str,
    ) -> None:
        self._series.count_record_failure()
        log.warning(
            "delivery_outcome_not_recorded",
            status=outcome.last_status,
            error=error,
            requeue_after_s=RECORD_FAILURE_PAUSE_S,
        )
        await asyncio.sleep(RECORD_FAILURE_PAUSE_S)
        await self._give_back(message)

    async def _give_back(self, message: AbstractIncomingMessage) -> None:
        """Back to the queue, unacked. While the consumer is being cancelled (stop, circuit
        opening) this waits for the cancel first: a message given back to a live
        subscription comes straight back, and on RabbitMQ before 4.3 every return counts
        towards a quorum queue's delivery limit. ``basic.nack``, not ``basic.reject``: from
        4.3 a nack does not count at all."""
        if self._holding_back():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unsubscribed.wait(), timeout=UNSUBSCRIBE_WAIT_S)
        if self._claim(message):
            await self._requeue(message)

    def _observe(
        self,
        outcome: Outcome,
        envelope: Envelope | None,
        message: AbstractIncomingMessage,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        decision, result = outcome.decision, outcome.result
        if decision.action is Action.FILTER:
            # Not an attempt: no outcome series, no rates, nothing for the circuit.
            self._series.count_filtered()
            log.info(OUTCOME_EVENTS[decision.action], outcome=decision.action.value)
            return
        if decision.action is not Action.ACK:
            self._series.failed()  # also what was never attempted: invalid, handler errors
        self._series.count_outcome(decision.action)
        fields: dict[str, Any] = {"status": outcome.last_status, "outcome": decision.action.value}
        if result is not None:
            fields["duration_ms"] = round(result.duration_s * 1000, 1)
        if decision.action is Action.ACK:
            # From the first publish, not the envelope's timestamp: a backfilled or replayed
            # event may carry an old one. Without a publish time, this attempt was the first.
            published = headers.published_at_ms(message.headers)
            if published is not None:
                self._series.observe_end_to_end(max(0.0, (headers.now_ms() - published) / 1000))
            elif result is not None:
                self._series.observe_end_to_end(result.duration_s)
            log.info(OUTCOME_EVENTS[decision.action], **fields)
        else:
            fields["detail"] = outcome.detail
            if result is not None and result.error is not None:
                fields["error"] = result.error
            if decision.action is Action.RETRY:
                fields["next_delay_s"] = decision.delay_s
            else:
                assert decision.reason is not None
                fields["reason"] = decision.reason.value
                self._series.count_dead_letter(decision.reason.value)
                self._operational_events.event_dead_lettered(
                    self.endpoint.name,
                    event_id=envelope.id if envelope is not None else message.message_id,
                    event_type=envelope.type if envelope is not None else None,
                    reason=decision.reason.value,
                    attempts=outcome.attempts,
                    last_status=outcome.last_status,
                )
            log.warning(OUTCOME_EVENTS[decision.action], **fields)
        # Hookline's own failures say nothing about the endpoint: they neither open its
        # circuit nor reset the failure streak that would.
        if result is not None and result.error is not ErrorKind.HANDLER_ERROR:
            self._count(result)
