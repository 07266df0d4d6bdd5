"""``python -m worker send-test``: a signed ``hookline.test`` event to one endpoint, like
GitHub's ping. It goes straight to the endpoint, through the same client as deliveries
(signing, SSRF guard, TLS, timeouts), not through the broker, so the answer is immediate.
"""

from __future__ import annotations

import uuid

from producer.envelope import build_body
from worker.delivery import EndpointClient
from worker.outcomes import AttemptResult
from worker.settings import EndpointSettings, Settings

TEST_EVENT_TYPE = "hookline.test"
EXIT_FAILED = 1


async def send_test(
    settings: Settings, endpoint: EndpointSettings, sender: str = "`python -m worker send-test`"
) -> tuple[str, AttemptResult]:
    """One signed test event to ``endpoint``: its id, and what the attempt came to."""
    event_id, body = build_body(
        TEST_EVENT_TYPE,
        {"endpoint": endpoint.name, "message": f"Test event sent by {sender}"},
        event_id=f"test_{uuid.uuid4().hex}",
    )
    client = EndpointClient(settings, endpoint)
    try:
        return event_id, await client.attempt(event_id, body)
    finally:
        await client.close()


async def run_send_test(settings: Settings, endpoint_name: str) -> int:
    endpoint = settings.endpoint(endpoint_name)
    event_id, result = await send_test(settings, endpoint)
    took_ms = round(result.duration_s * 1000, 1)
    if result.status is not None:
        print(f"{endpoint.name}: HTTP {result.status} in {took_ms} ms (event {event_id})")
        if result.detail and not result.delivered:
            print(f"response: {result.detail}")
    else:
        print(f"{endpoint.name}: {result.error} after {took_ms} ms: {result.detail}")
    return 0 if result.delivered else EXIT_FAILED
