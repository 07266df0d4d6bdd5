"""HTTP receivers for the benchmarks, each in its own process so it never shares a core's
event loop with what is measured.

- nginx (Debian's package, installed here if missing) answering 204 to everything and
  logging ``$msec $http_webhook_id`` per request: the fast receiver.
- an aiohttp fallback with the same log format when nginx cannot be had.
- an aiohttp receiver that waits ``delay_s`` before answering (I/O-bound endpoints, hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

NGINX_CONF = """
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    log_format hits '$msec $http_webhook_id';
    server {{
        listen 127.0.0.1:{port} reuseport;
        keepalive_requests 1000000;
        location / {{
            access_log {root}/access.log hits;
            return 204;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ensure_nginx() -> str | None:
    """nginx's path, installing Debian's nginx-light if it is missing; None if impossible."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found:
        return found
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "nginx-light"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


class Receiver:
    """A receiver process; ``hits()`` reads (time, webhook-id) per request from its log."""

    def __init__(self, root: Path, delay_s: float = 0.0, prefer_nginx: bool = True) -> None:
        self.root = root
        self.delay_s = delay_s
        self.port = free_port()
        self.kind = "aiohttp"
        self._process: subprocess.Popen[bytes] | None = None
        self._nginx = ensure_nginx() if prefer_nginx and delay_s == 0 else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def log(self) -> Path:
        return self.root / "access.log"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        if self._nginx:
            self.kind = "nginx"
            (self.root / "nginx.conf").write_text(NGINX_CONF.format(root=self.root, port=self.port))
            subprocess.run([self._nginx, "-c", str(self.root / "nginx.conf")], check=True)
        else:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.receivers",
                    str(self.port),
                    str(self.delay_s),
                    str(self.log),
                ]
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError("receiver did not start")

    def stop(self) -> None:
        if self.kind == "nginx" and self._nginx:
            subprocess.run(
                [self._nginx, "-c", str(self.root / "nginx.conf"), "-s", "stop"],
                check=False,
                capture_output=True,
            )
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def count(self) -> int:
        with self.log.open("rb") as handle:
            return handle.read().count(b"\n")

    def hits(self) -> list[tuple[float, str]]:
        rows = []
        for line in self.log.read_text().splitlines():
            stamp, _, webhook_id = line.partition(" ")
            rows.append((float(stamp), webhook_id))
        return rows

    def reset(self) -> None:
        self.log.write_text("")
        if self.kind == "nginx" and self._nginx:  # reopen the truncated log
            subprocess.run(
                [self._nginx, "-c", str(self.root / "nginx.conf"), "-s", "reopen"],
                check=False,
                capture_output=True,
            )


async def _serve(port: int, delay_s: float, log_path: str) -> None:
    from aiohttp import web

    log = Path(log_path).open("a", buffering=1)  # noqa: SIM115 - lives as long as the server

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if delay_s:
            await asyncio.sleep(delay_s)
        log.write(f"{time.time():.3f} {request.headers.get('webhook-id', '-')}\n")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]))
