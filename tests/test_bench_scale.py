"""Benchmark scenario (h) "endpoint count" (bench/scale.py), end to end at 5 endpoints.

One worker subprocess with 5 endpoints on classic queues against the real broker and the
benchmark's loopback receiver: it becomes ready cold and warm, one event reaches every
endpoint, a SIGHUP that changes one endpoint is applied, and every queue and exchange of the
run is deleted afterwards. Each phase is bounded by its timeout.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from bench import scale

pytestmark = pytest.mark.slow


async def test_five_endpoints_end_to_end_and_cleaned_up(tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        receiver = scale.ScaleReceiver()
        await receiver.start(session)
        try:
            row = await asyncio.wait_for(
                scale.run_count(5, "classic", 0, receiver, session, tmp_path, timeout_s=30),
                timeout=300,
            )
        finally:
            receiver.stop()
    assert row.failures == {}, row.failures
    assert row.delivered == 5
    assert row.queues is not None and row.queues >= 5  # one per endpoint, and shared ones
    assert row.cold_ready_s is not None and row.warm_ready_s is not None
    assert row.rss_idle_mb is not None and row.rss_delivering_mb is not None
    assert row.metrics_series is not None and row.metrics_series > 0
    assert row.reload_s is not None
    assert row.left_behind == 0
    assert "| 5 | classic |" in scale.table([row])
