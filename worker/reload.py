"""What a config reload changes: a pure comparison of the running and the re-read settings.

The worker applies the plan (``Worker.reload``); keeping the comparison here makes the
rules easy to read and to test: which endpoints are added, removed or changed, and which
sections only a restart can change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.settings import EndpointSettings, Settings

# A running worker keeps its connections and its listening port; these sections apply
# at the next start, and a reload says so.
RESTART_ONLY_SECTIONS = ("broker", "metrics", "worker", "registry", "api")


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    settings: Settings  # the re-read settings, with the restart-only sections kept as they were
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    needs_restart: tuple[str, ...]


def plan_reload(running: Settings, loaded: Settings) -> ReloadPlan:
    needs_restart = tuple(
        name for name in RESTART_ONLY_SECTIONS if getattr(loaded, name) != getattr(running, name)
    )
    new = loaded.model_copy(update={name: getattr(running, name) for name in needs_restart})
    before = {endpoint.name: endpoint for endpoint in running.endpoints}
    after = {endpoint.name: endpoint for endpoint in new.endpoints}
    # A registry change keeps every other endpoint's object as it was: with the sections
    # equal, the same object is the same consumer, and the comparison (costly at 10,000
    # endpoints, each comparing its signing keys) is skipped.
    sections_equal = shared_inputs(running) == shared_inputs(new)
    changed = tuple(
        name
        for name, endpoint in after.items()
        if name in before
        and not (sections_equal and before[name] is endpoint)
        and consumer_inputs(running, before[name]) != consumer_inputs(new, endpoint)
    )
    return ReloadPlan(
        settings=new,
        added=tuple(name for name in after if name not in before),
        removed=tuple(name for name in before if name not in after),
        changed=changed,
        unchanged=tuple(name for name in after if name in before and name not in changed),
        needs_restart=needs_restart,
    )


def consumer_inputs(settings: Settings, endpoint: EndpointSettings) -> tuple[Any, ...]:
    """Everything an endpoint's consumer is built from; if any of it differs, the consumer
    is replaced. Secrets compare by value, so a rotation counts as a change."""
    return (endpoint, endpoint.signing_keys, *shared_inputs(settings))


def shared_inputs(settings: Settings) -> tuple[Any, ...]:
    """The sections every consumer is built from."""
    return (settings.delivery, settings.retry, settings.security, settings.circuit_breaker)
