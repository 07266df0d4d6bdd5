"""``make demo`` (examples/demo.py), one of README's two commands, runs end to end."""

from __future__ import annotations

import asyncio
import sys

import pytest

from tests.conftest import REPO, Broker
from worker.settings import load_settings


@pytest.mark.slow
async def test_demo_delivers_dead_letters_and_stops_cleanly(broker: Broker) -> None:
    """The demo's events arrive verified, flaky's ends in the dead-letter queue and raises
    an operational event, the ping answers, and the worker exits 0."""
    settings = load_settings(REPO / "config.yaml")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "examples/demo.py",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await broker.delete_all(settings)
    text = out.decode()
    assert process.returncode == 0, text
    assert "attempts_exhausted" in text and "1 dead letter" in text
    assert "hookline.event.dead_lettered" in text
    assert "orders: HTTP 2" in text
    assert "worker exit code 0" in text
