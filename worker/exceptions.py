"""The worker's branch of Hookline's one exception tree (rooted in ``producer.exceptions``)."""

from __future__ import annotations

from producer.exceptions import (
    ConfigError,
    HooklineError,
    InvalidEnvelope,
    NotConfirmed,
    PublishError,
    Unroutable,
)

__all__ = [
    "BlockedDestination",
    "BrokerUnavailable",
    "ConfigError",
    "HooklineError",
    "InvalidEnvelope",
    "ListenError",
    "ManagementUnavailable",
    "NotConfirmed",
    "PublishError",
    "RegistryUnavailable",
    "SecretUnreadable",
    "TopologyConflict",
    "Unroutable",
]


class BlockedDestination(HooklineError):
    """The endpoint's address is refused by the ``security`` settings (SSRF guard)."""


class ListenError(HooklineError):
    """The metrics and health server cannot listen on its configured address."""


class TopologyConflict(HooklineError):
    """A queue or exchange exists on the broker with other arguments than Hookline declares."""


class ManagementUnavailable(HooklineError):
    """RabbitMQ's management API could not be read (the message never holds a password)."""


class RegistryUnavailable(HooklineError):
    """The endpoint registry's database could not be reached (the message never holds a
    password)."""


class SecretUnreadable(HooklineError):
    """A stored endpoint secret that no configured key opens (wrong key, or tampered with)."""


class BrokerUnavailable(HooklineError):
    """RabbitMQ did not do what a request needed: away, too slow, or refusing."""
