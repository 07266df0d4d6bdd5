"""The broker nodes' file-descriptor headroom, read from RabbitMQ's management API.

AMQP does not tell a client how close a node is to its open-file limit, and a node that runs
out does not raise an alarm: it accepts TCP connections and never answers the AMQP handshake
(docs/operations.md, *RabbitMQ's open-file limit*). Each quorum queue holds files open, so
this is the wall a growing endpoint count meets first. ``worker status --management-url``
reads ``/api/nodes`` and warns when a node's limit is low or mostly used.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from producer.settings import mask_url
from worker.exceptions import ManagementUnavailable

# Below this, a node wedges once a few hundred quorum queues exist (measured: 270-540 with
# 1,024 files); RabbitMQ's own production guidance is 65,536 and up.
LOW_FILE_LIMIT = 4096
# Used share of the limit from which a node is reported as short of headroom.
HIGH_USE = 0.8
TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class NodeFiles:
    name: str
    # None until the node's management agent has reported them (a few seconds after start).
    fd_used: int | None
    fd_total: int | None

    def describe(self) -> str:
        if self.fd_used is None or self.fd_total is None:
            return "open files not reported yet"
        return self.warning or f"{self.fd_used} of {self.fd_total} open files"

    @property
    def warning(self) -> str | None:
        if self.fd_total is None or self.fd_used is None:
            return None
        if self.fd_total < LOW_FILE_LIMIT:
            return (
                f"open-file limit {self.fd_total} is low: a node wedges without an alarm once "
                "its file handles run out (raise LimitNOFILE / ulimit -n)"
            )
        if self.fd_used >= HIGH_USE * self.fd_total:
            return f"{self.fd_used} of {self.fd_total} open files in use"
        return None


async def read_nodes(management_url: str) -> list[NodeFiles]:
    """Every node's open files, from ``<management_url>/api/nodes`` (basic auth from the
    URL's user and password). Raises :class:`ManagementUnavailable` with a message free of the
    password."""
    parsed = URL(management_url)
    headers = {}
    if parsed.user:
        credentials = f"{parsed.user}:{parsed.password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
    base = parsed.with_user(None).with_password(None)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
            session.get(base / "api" / "nodes") as response,
        ):
            if response.status != 200:
                raise ManagementUnavailable(
                    f"{mask_url(management_url)} answered {response.status}"
                )
            document = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ManagementUnavailable(
            f"{mask_url(management_url)}: {exc.__class__.__name__}"
        ) from None
    if not isinstance(document, list):
        raise ManagementUnavailable(f"{mask_url(management_url)}: not a list of nodes")
    return [_node(entry) for entry in document if isinstance(entry, dict)]


def _node(entry: dict[str, Any]) -> NodeFiles:
    def count(key: str) -> int | None:
        value = entry.get(key)
        return value if type(value) is int else None

    name = str(entry.get("name", "?"))
    return NodeFiles(name=name, fd_used=count("fd_used"), fd_total=count("fd_total"))
