"""Hookline's publishing SDK: put events on the exchange, confirmed by the broker."""

from producer.envelope import Envelope, build_body, new_event_id, parse_envelope
from producer.exceptions import (
    BrokerUnreachable,
    ConfigError,
    HooklineError,
    InvalidEnvelope,
    NotConfirmed,
    PublishError,
    Unroutable,
)
from producer.publisher import EventSpec, Publisher

__version__ = "0.2.0"

__all__ = [
    "BrokerUnreachable",
    "ConfigError",
    "Envelope",
    "EventSpec",
    "HooklineError",
    "InvalidEnvelope",
    "NotConfirmed",
    "PublishError",
    "Publisher",
    "Unroutable",
    "__version__",
    "build_body",
    "new_event_id",
    "parse_envelope",
]
