"""Benchmark scenario (j) "registry" (bench/registry.py), end to end at 50 endpoints.

The command as `make bench-registry` runs it, scaled down: the API and two workers as
subprocesses against the local PostgreSQL and RabbitMQ, 50 endpoints registered through the
API, 20 requests of each kind timed, 5 URL changes followed to both workers, one worker
restarted. It must finish without a failed phase, write the JSON the docs are built from,
and leave neither a queue, an exchange nor its PostgreSQL schema behind.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from bench import registry
from tests.conftest import DATABASE_URL

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_percentile_is_nearest_rank() -> None:
    """p99 of 100 values is the 99th smallest; p50 of an odd count is the median."""
    values = [float(n) for n in range(1, 101)]
    assert registry.percentile(values, 0.99) == 99.0
    assert registry.percentile(values, 0.50) == 50.0
    assert registry.percentile([3.0, 1.0, 2.0], 0.50) == 2.0
    assert registry.p50_p99([]) == (None, None)


async def schema_exists(name: str) -> bool:
    connection = await asyncpg.connect(DATABASE_URL)
    try:
        found = await connection.fetchval(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1", name
        )
    finally:
        await connection.close()
    return bool(found)


def test_fifty_endpoints_five_changes_end_to_end(tmp_path: Path) -> None:
    """Every phase succeeds and the JSON holds the figures, the targets and the command;
    nothing of the run is left on the broker or in PostgreSQL."""
    out = tmp_path / "registry.json"
    argv = ["--endpoints", "50", "--changes", "5", "--requests", "20", "--timeout-s", "120"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.registry", *argv, "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| API get p50 / p99 ms |" in done.stdout
    document = json.loads(out.read_text())
    assert document["scenario"] == "registry"
    assert document["command"].startswith("python -m bench.registry --endpoints 50")
    assert set(document["targets"]) == set(registry.TARGETS)
    assert document["environment"]["samples"] == {"get": 20, "list": 20, "create": 20}
    figures = document["figures"]
    assert figures["failures"] == {}
    assert figures["registered"] == 50
    assert figures["queues_with_both_consumers"] == 50
    assert figures["register_per_s"] > 0
    assert figures["ready_after_first_create_s"] >= figures["ready_after_last_create_s"]
    for kind in ("create", "get", "list"):
        assert 0 < figures[f"{kind}_p50_ms"] <= figures[f"{kind}_p99_ms"]
    assert len(figures["propagation"]) == 5
    assert all(len(sample["applied_s"]) == 2 for sample in figures["propagation"])
    assert figures["propagation_p50_s"] <= figures["propagation_p99_s"]
    assert figures["propagation_p99_s"] <= figures["propagation_max_s"]
    assert figures["stale_after_applied"] == 0
    assert len(figures["worker_rss_ready_mb"]) == 2
    assert figures["cold_start_s"] > 0
    # 50 registered, then 20 more through the create timings.
    assert figures["registry_endpoints_metric"] == [70.0, 70.0]
    assert set(figures["cpu_s"]) == {"register", "latency", "propagation", "cold start"}
    assert isinstance(figures["disturbances"], list)
    assert figures["cleanup_left_behind"] == 0
    assert not asyncio.run(schema_exists(figures["schema"]))
