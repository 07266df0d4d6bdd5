"""The one exception tree of Hookline; the worker extends it in ``worker.exceptions``."""

from __future__ import annotations


class HooklineError(Exception):
    """Base of every error Hookline raises on purpose."""


class ConfigError(HooklineError):
    """The configuration (file, field or environment) is unusable.

    The message names the file and the field and never contains a secret value.
    """


class InvalidEnvelope(HooklineError):
    """A message body is not a valid Hookline envelope."""


class PublishError(HooklineError):
    """An event could not be handed safely to the broker."""


class NotConfirmed(PublishError):
    """The broker did not confirm the message (nack, timeout or lost connection)."""


class BrokerUnreachable(NotConfirmed):
    """No broker answered within ``retry_for_s`` when connecting: nothing was published."""


class Unroutable(PublishError):
    """The broker returned the message: no queue is bound for its routing key."""


def error_lines(error: BaseException) -> str:
    """An error as command-line output: every line starts with ``error:``."""
    return "\n".join(f"error: {line}" for line in (str(error) or type(error).__name__).splitlines())
