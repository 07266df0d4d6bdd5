"""Hookline's own events, published onto the exchange like any other event, so an operator
subscribes an alerting endpoint to them (``events: ["hookline.#"]``).

- ``hookline.endpoint.failing``: an endpoint's circuit opened (once per outage, not on
  every failed probe).
- ``hookline.endpoint.recovered``: its circuit closed again.
- ``hookline.event.dead_lettered``: a delivery ended in the dead-letter queue.

They never loop: an event whose own type starts with ``hookline.`` produces no
``dead_lettered`` event when it is dead-lettered, and failing/recovered are emitted on
circuit changes only, which the cool-down bounds. Publishing is best effort and off the
delivery path: a lost operational event is logged, never retried into a loop.

They carry ``hookline-mandatory: 1``, as SDK events do: with no ``hookline.#`` subscriber the
broker returns them instead of keeping them in ``<exchange>.unrouted``, where they would push
out real unrouted events and inflate ``webhook_unrouted_messages``. Nobody subscribing is an
operator's choice, so that is logged at info, not as a failure.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aio_pika.abc import AbstractExchange

from producer.envelope import build_body
from producer.headers import MANDATORY, PUBLISHED_AT, now_ms
from producer.publisher import persistent_message, publish_confirmed
from worker.exceptions import PublishError, Unroutable

OPERATIONAL_PREFIX = "hookline."
ENDPOINT_FAILING = "hookline.endpoint.failing"
ENDPOINT_RECOVERED = "hookline.endpoint.recovered"
EVENT_DEAD_LETTERED = "hookline.event.dead_lettered"

log = structlog.get_logger("hookline.operational_events")


def is_operational(event_type: str | None) -> bool:
    return event_type is not None and event_type.startswith(OPERATIONAL_PREFIX)


class OperationalEvents:
    def __init__(self, exchange: AbstractExchange, timeout_s: float, *, enabled: bool) -> None:
        self._exchange = exchange
        self._timeout_s = timeout_s
        self.enabled = enabled
        self._tasks: set[asyncio.Task[None]] = set()

    def endpoint_failing(
        self, endpoint: str, *, consecutive_failures: int, last_status: str, cooldown_s: float
    ) -> None:
        self._emit(
            ENDPOINT_FAILING,
            {
                "endpoint": endpoint,
                "consecutive_failures": consecutive_failures,
                "last_status": last_status,
                "retry_in_s": cooldown_s,
            },
        )

    def endpoint_recovered(self, endpoint: str, *, outage_s: float | None) -> None:
        self._emit(
            ENDPOINT_RECOVERED,
            {
                "endpoint": endpoint,
                "outage_s": round(outage_s, 3) if outage_s is not None else None,
            },
        )

    def event_dead_lettered(
        self,
        endpoint: str,
        *,
        event_id: str | None,
        event_type: str | None,
        reason: str,
        attempts: int,
        last_status: str,
    ) -> None:
        if is_operational(event_type):
            return
        self._emit(
            EVENT_DEAD_LETTERED,
            {
                "endpoint": endpoint,
                "event_id": event_id,
                "event_type": event_type,
                "reason": reason,
                "attempts": attempts,
                "last_status": last_status,
            },
        )

    def _emit(self, event_type: str, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        task = asyncio.create_task(self._publish(event_type, data), name=event_type)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, event_type: str, data: dict[str, Any]) -> None:
        event_id, body = build_body(event_type, data)
        try:
            await publish_confirmed(
                self._exchange,
                persistent_message(
                    body, message_id=event_id, headers={MANDATORY: "1", PUBLISHED_AT: now_ms()}
                ),
                event_type,
                self._timeout_s,
            )
        except Unroutable:
            endpoint = data.get("endpoint")
            log.info("operational_event_unsubscribed", event_type=event_type, endpoint=endpoint)
        except PublishError as exc:
            log.warning(
                "operational_event_not_published",
                event_type=event_type,
                endpoint=data.get("endpoint"),
                error=str(exc),
            )
        else:
            log.info(
                "operational_event_published",
                event_type=event_type,
                event_id=event_id,
                endpoint=data.get("endpoint"),
            )

    async def close(self, timeout_s: float) -> None:
        """Give events being published a bounded time to be confirmed."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
