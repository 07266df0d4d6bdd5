"""Opening broker connections the same way everywhere: robust, named, TLS verified."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from producer.settings import BrokerSettings


async def connect(broker: BrokerSettings, name: str) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself) named ``name`` for operators."""
    return await aio_pika.connect_robust(
        broker.connection_url(),
        ssl_context=broker.ssl_context(),
        client_properties={"connection_name": name},
        reconnect_interval=broker.reconnect_interval_s,
    )
