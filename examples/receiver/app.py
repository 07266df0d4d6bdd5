"""A webhook receiver that does what every Hookline receiver should.

1. Verify the Standard Webhooks signature with the public ``standardwebhooks`` library,
   which also rejects timestamps more than 5 minutes off (replayed requests).
2. Deduplicate by ``webhook-id``: Hookline delivers at least once, so a retry after a
   lost response arrives again with the same id.
3. Optionally accept requests only from the sender's egress addresses.
4. Answer 2xx at once and do the work afterwards, so slow processing never turns into
   timeouts and retries.

Run: ``python examples/receiver/app.py --route /webhooks/orders=whsec_... --port 8765``
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from collections import OrderedDict
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class SeenIds:
    """Remembers the last ``capacity`` webhook ids; enough to absorb retries of recent events."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def add(self, webhook_id: str) -> bool:
        """False when ``webhook_id`` was seen before."""
        if webhook_id in self._ids:
            self._ids.move_to_end(webhook_id)
            return False
        self._ids[webhook_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True


def build_app(
    routes: dict[str, str],
    *,
    failing_paths: frozenset[str] = frozenset(),
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
    quiet: bool = False,
) -> web.Application:
    verifiers = {path: Webhook(secret) for path, secret in routes.items()}
    seen = SeenIds()
    work: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        if allowed_networks:
            peer = ipaddress.ip_address(request.remote or "0.0.0.0")
            if not any(peer in network for network in allowed_networks):
                return web.Response(status=403, text="sender address not allowed")
        if request.path in failing_paths:
            return web.Response(status=503, text="this demo endpoint always fails")
        verifier = verifiers.get(request.path)
        if verifier is None:
            return web.Response(status=404)
        body = await request.read()
        try:
            event = verifier.verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            return web.Response(status=401, text=f"signature rejected: {exc}")
        # One seen-set per route: in this demo several endpoints share one server, and the
        # same event legitimately reaches each of them with the same webhook-id.
        if not seen.add(f"{request.path} {request.headers['webhook-id']}"):
            return web.Response(status=200, text="duplicate, already processed")
        work.put_nowait((request.path, event))
        return web.Response(status=204)

    async def process(app: web.Application) -> Any:
        async def loop() -> None:
            while True:
                path, event = await work.get()
                if not quiet:
                    print(
                        f"signature verified  {path}  {event['type']}  {event['id']}  "
                        f"data={json.dumps(event['data'])}",
                        flush=True,
                    )

        task = asyncio.create_task(loop())
        yield
        task.cancel()

    app = web.Application()
    app.router.add_post("/{tail:.*}", receive)
    app.cleanup_ctx.append(process)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--route", action="append", default=[], help="PATH=whsec_...")
    parser.add_argument("--fail", action="append", default=[], help="PATH that answers 503")
    parser.add_argument("--allow-network", action="append", default=[], help="CIDR")
    args = parser.parse_args()
    routes = dict(route.split("=", 1) for route in args.route)
    if not routes:
        sys.exit("give at least one --route PATH=whsec_...")
    app = build_app(
        routes,
        failing_paths=frozenset(args.fail),
        allowed_networks=tuple(ipaddress.ip_network(cidr) for cidr in args.allow_network),
    )
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
