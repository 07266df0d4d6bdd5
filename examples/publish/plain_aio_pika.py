"""Publishing a Hookline event with a plain AMQP client (aio-pika), without the SDK.

Everything the wire format asks for is here: the existing topic exchange, routing key =
type, a JSON envelope, persistent delivery and publisher confirms.

    python examples/publish/plain_aio_pika.py amqp://guest:guest@127.0.0.1:5672/ webhooks
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime

import aio_pika


async def publish(url: str, exchange_name: str, event_type: str, data: dict[str, object]) -> str:
    event_id = f"evt_{uuid.uuid4().hex}"
    body = json.dumps(
        {
            "id": event_id,
            "type": event_type,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": data,
        }
    ).encode()
    connection = await aio_pika.connect_robust(url)
    async with connection:
        # Confirms are on by default; on_return_raises turns "no queue bound" into an error.
        channel = await connection.channel(on_return_raises=True)
        # Passive: the worker declares the exchange (with its alternate exchange); a
        # declaration with other arguments would be refused by the broker.
        exchange = await channel.get_exchange(exchange_name, ensure=True)
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,  # aio-pika defaults to transient
                message_id=event_id,
                # Ask for unroutable events back (PublishError) instead of having them kept
                # in the bounded queue <exchange>.unrouted.
                headers={"hookline-mandatory": "1"},
            ),
            routing_key=event_type,
            mandatory=True,
            timeout=10,
        )
    return event_id


if __name__ == "__main__":
    url, exchange = sys.argv[1], sys.argv[2]
    print(asyncio.run(publish(url, exchange, "order.created", {"order_id": 1})))
