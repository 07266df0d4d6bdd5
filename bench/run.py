"""`make bench`: Hookline against the naive loop, on this machine, loopback only.

Every scenario runs its contenders in the same session against the same broker and receiver,
so the ratios hold even though absolute figures drift on a shared machine. The Markdown table
goes to stdout; the figures go to bench/results/<timestamp>.json, with a PNG plot beside them.

    python -m bench.run            # the full run (about 25 minutes with the 10-minute soak)
    python -m bench.run --quick    # one repetition, smaller loads, 1-minute soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import yaml

from bench.receivers import Receiver, free_port
from producer import EventSpec, Publisher
from worker.settings import Settings, settings_from_document
from worker.topology import declare_all, endpoint_queue, exchange_names, queue_names

AMQP_URL = os.environ.get("HOOKLINE_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BLOB = "x" * 930  # makes each envelope about 1 KiB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUEUE_TYPE = ["quorum"]  # set from --queue-type


@dataclass
class Plan:
    repetitions: int = 3
    drain_events: int = 20_000
    latency_rate: int = 500
    latency_s: float = 30.0
    soak_s: float = 600.0
    scale_events: int = 4_000
    isolation_events: int = 10_000
    fanout_events: int = 2_000


@dataclass
class Run:
    """One contender's run: what the receiver saw and what the process cost."""

    deliveries: int
    seconds: float
    cpu_s: float = 0.0
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds if self.seconds else 0.0


@dataclass
class Results:
    environment: dict[str, Any] = field(default_factory=dict)
    scenarios: dict[str, Any] = field(default_factory=dict)


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return cpu_s, rss_kb / 1024


def endpoint_document(name: str, url: str, events: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "url": url,
        "events": events,
        "secret": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        **extra,
    }


def config_document(
    exchange: str, endpoints: list[dict[str, Any]], **sections: Any
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "broker": {"url": AMQP_URL, "exchange": exchange, "queue_type": QUEUE_TYPE[0]},
        "worker": {"shutdown_timeout_s": 10, "log_format": "json", "log_level": "info"},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "retry": {"delays_s": [5, 30]},
        "security": {"require_https": False, "allow_private_networks": True},
        "endpoints": endpoints,
    }
    for name, values in sections.items():
        document[name] = {**document.get(name, {}), **values}
    return document


class Bench:
    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self.results = Results()

    # -- broker helpers ---------------------------------------------------------------

    async def prepare(self, document: dict[str, Any]) -> Settings:
        settings = settings_from_document(document, Path("bench.yaml"), {})
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await declare_all(await connection.channel(), settings)
        return settings

    async def preload(self, exchange: str, event_type: str, count: int) -> list[str]:
        async with Publisher(AMQP_URL, exchange) as publisher:
            return await publisher.publish_many(
                EventSpec(event_type, {"blob": BLOB, "n": n}) for n in range(count)
            )

    async def cleanup(self, settings: Settings) -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for name in queue_names(settings):
                await channel.queue_delete(name, if_unused=False, if_empty=False)
            for name in exchange_names(settings.broker.exchange):
                await channel.exchange_delete(name)

    @contextlib.asynccontextmanager
    async def deployed(
        self, endpoints: list[dict[str, Any]], preload: tuple[str, int] | None = None
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """A fresh exchange with its topology (and a preloaded backlog), deleted afterwards."""
        exchange = f"hl-bench-{uuid.uuid4().hex[:8]}"
        document = config_document(exchange, endpoints)
        settings = await self.prepare(document)
        try:
            if preload is not None:
                await self.preload(exchange, *preload)
            yield exchange, document
        finally:
            await self.cleanup(settings)

    async def measure(
        self, receiver: Receiver, processes: list[subprocess.Popen[bytes]], expected: int
    ) -> Run:
        """Watch the first process until the receiver has ``expected`` hits, then stop all."""
        try:
            return await self.watch(receiver, processes[0], expected, 600)
        finally:
            for process in processes:
                self.stop(process)

    # -- processes --------------------------------------------------------------------

    async def start_hookline(self, document: dict[str, Any]) -> subprocess.Popen[bytes]:
        config = self.workdir / f"config-{uuid.uuid4().hex[:6]}.yaml"
        config.write_text(yaml.safe_dump(document))
        log = (self.workdir / "worker.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        port = document["metrics"]["port"]
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                        if response.status == 200:
                            return process
                await asyncio.sleep(0.05)
        process.kill()
        raise RuntimeError("worker did not become ready; see worker.log")

    async def start_naive(self, queue: str, url: str, concurrent: bool) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "bench.naive", AMQP_URL, queue, url]
        if concurrent:
            command.append("--concurrent")
        process = subprocess.Popen(command, cwd=ROOT)
        await asyncio.sleep(0.5)
        return process

    @staticmethod
    def stop(process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    async def watch(
        self, receiver: Receiver, process: subprocess.Popen[bytes], expected: int, timeout_s: float
    ) -> Run:
        """Wait until the receiver has ``expected`` hits; time them first hit to last."""
        cpu_start, rss_peak = proc_stats(process.pid)
        deadline = time.monotonic() + timeout_s
        while receiver.count() < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {receiver.count()} of {expected} deliveries arrived")
            rss_peak = max(rss_peak, proc_stats(process.pid)[1])
            await asyncio.sleep(0.1)
        cpu_end, rss_end = proc_stats(process.pid)
        hits = receiver.hits()
        seconds = max(hits[-1][0] - hits[0][0], 1e-3)
        return Run(expected, seconds, cpu_end - cpu_start, max(rss_peak, rss_end), rss_end)

    # -- scenarios --------------------------------------------------------------------

    async def drain(self, receiver: Receiver) -> None:
        """(a) drain 20,000 preloaded 1 KiB events to one endpoint; (c) RSS; (d) CPU."""
        runs: dict[str, list[Run]] = {"naive": [], "naive_concurrent": [], "hookline": []}
        for repetition in range(self.plan.repetitions):
            for contender in runs:
                endpoints = [endpoint_document("fast", receiver.url, ["bench.#"])]
                backlog = ("bench.drain", self.plan.drain_events)
                async with self.deployed(endpoints, backlog) as (exchange, document):
                    receiver.reset()
                    if contender == "hookline":
                        process = await self.start_hookline(document)
                    else:
                        process = await self.start_naive(
                            endpoint_queue(exchange, "fast"),
                            receiver.url,
                            concurrent=contender == "naive_concurrent",
                        )
                    run = await self.measure(receiver, [process], self.plan.drain_events)
                runs[contender].append(run)
                print(
                    f"  drain rep {repetition + 1} {contender}: {run.rate:,.0f}/s, "
                    f"cpu {run.cpu_s:.1f}s, rss peak {run.rss_peak_mb:.0f} MB",
                    flush=True,
                )
        self.results.scenarios["drain"] = {
            name: [vars(run) | {"rate": run.rate} for run in rs] for name, rs in runs.items()
        }

    async def latency(self, receiver: Receiver) -> None:
        """(b) publish at a fixed rate; publish-to-delivered percentiles, per queue type."""
        runs: dict[str, list[dict[str, float]]] = {"quorum": [], "classic": []}
        for _ in range(self.plan.repetitions):
            for queue_type in runs:
                runs[queue_type].append(await self._latency_once(receiver, queue_type))
                last = runs[queue_type][-1]
                print(
                    f"  latency {queue_type}: p50 {last['p50_ms']:.1f} ms, "
                    f"p95 {last['p95_ms']:.1f} ms, p99 {last['p99_ms']:.1f} ms",
                    flush=True,
                )
        self.results.scenarios["latency"] = {"rate_per_s": self.plan.latency_rate, **runs}

    async def _latency_once(self, receiver: Receiver, queue_type: str) -> dict[str, float]:
        exchange = f"hl-bench-{uuid.uuid4().hex[:8]}"
        document = config_document(exchange, [endpoint_document("fast", receiver.url, ["bench.#"])])
        document["broker"]["queue_type"] = queue_type
        settings = await self.prepare(document)
        receiver.reset()
        process = await self.start_hookline(document)
        published: dict[str, float] = {}
        total = int(self.plan.latency_rate * self.plan.latency_s)
        try:
            async with Publisher(AMQP_URL, exchange) as publisher:
                pending: set[asyncio.Task[str]] = set()
                started = time.monotonic()
                for n in range(total):
                    await asyncio.sleep(
                        max(0.0, started + n / self.plan.latency_rate - time.monotonic())
                    )
                    event_id = f"lat-{n}"
                    published[event_id] = time.time()
                    task = asyncio.create_task(
                        publisher.publish("bench.latency", {"blob": BLOB}, event_id=event_id)
                    )
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.gather(*pending)
            await self.watch(receiver, process, total, 120)
        finally:
            self.stop(process)
            await self.cleanup(settings)
        latencies_ms = sorted(
            (at - published[webhook_id]) * 1000
            for at, webhook_id in receiver.hits()
            if webhook_id in published
        )
        quantiles = statistics.quantiles(latencies_ms, n=100)
        return {
            "events": total,
            "p50_ms": quantiles[49],
            "p95_ms": quantiles[94],
            "p99_ms": quantiles[98],
            "max_ms": latencies_ms[-1],
        }

    async def soak(self, receiver: Receiver) -> None:
        """(c) RSS across a steady load of `soak_s` seconds at the latency rate."""
        exchange = f"hl-bench-{uuid.uuid4().hex[:8]}"
        document = config_document(exchange, [endpoint_document("fast", receiver.url, ["bench.#"])])
        settings = await self.prepare(document)
        receiver.reset()
        process = await self.start_hookline(document)
        samples: list[tuple[float, float]] = []
        try:
            async with Publisher(AMQP_URL, exchange) as publisher:
                started = time.monotonic()
                n = 0
                while (elapsed := time.monotonic() - started) < self.plan.soak_s:
                    batch = [
                        EventSpec("bench.soak", {"blob": BLOB})
                        for _ in range(self.plan.latency_rate // 10)
                    ]
                    await publisher.publish_many(batch)
                    n += len(batch)
                    if not samples or elapsed - samples[-1][0] >= 5:
                        samples.append((elapsed, proc_stats(process.pid)[1]))
                    await asyncio.sleep(
                        max(0.0, started + n / self.plan.latency_rate - time.monotonic())
                    )
            await self.watch(receiver, process, n, 120)
            samples.append((time.monotonic() - started, proc_stats(process.pid)[1]))
        finally:
            self.stop(process)
            await self.cleanup(settings)
        # Start after the first minute (or tenth): allocator and caches warm up first.
        warm = [rss for at, rss in samples if at >= min(60.0, self.plan.soak_s / 10)] or [
            samples[-1][1]
        ]
        self.results.scenarios["soak"] = {
            "seconds": self.plan.soak_s,
            "events": n,
            "rss_warm_mb": warm[0],
            "rss_end_mb": samples[-1][1],
            "rss_max_mb": max(rss for _, rss in samples),
            "growth": samples[-1][1] / warm[0] - 1,
            "samples": samples,
        }
        print(f"  soak {n} events: rss {warm[0]:.1f} -> {samples[-1][1]:.1f} MB", flush=True)

    async def scale(self, slow: Receiver) -> None:
        """(e) 1 vs 2 worker processes against an endpoint that takes 50 ms per request."""
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(self.plan.repetitions):
            for workers in (1, 2):
                endpoints = [endpoint_document("slow", slow.url, ["bench.#"], max_in_flight=16)]
                backlog = ("bench.scale", self.plan.scale_events)
                async with self.deployed(endpoints, backlog) as (_, document):
                    slow.reset()
                    processes = [
                        await self.start_hookline(
                            {**document, "metrics": {"host": "127.0.0.1", "port": free_port()}}
                        )
                        for _ in range(workers)
                    ]
                    run = await self.measure(slow, processes, self.plan.scale_events)
                rates[workers].append(run.rate)
                print(f"  scale {workers} worker(s): {run.rate:,.0f}/s", flush=True)
        self.results.scenarios["scale"] = {"one": rates[1], "two": rates[2]}

    async def isolation(self, fast: Receiver, hang: Receiver) -> None:
        """(f) throughput to a fast endpoint, alone and while another endpoint hangs."""
        rates: dict[str, list[float]] = {"alone": [], "with_hung": []}
        for _ in range(self.plan.repetitions):
            for case in rates:
                endpoints = [endpoint_document("fast", fast.url, ["bench.#"])]
                if case == "with_hung":
                    endpoints.append(endpoint_document("hung", hang.url, ["bench.#"], timeout_s=5))
                backlog = ("bench.isolation", self.plan.isolation_events)
                async with self.deployed(endpoints, backlog) as (_, document):
                    fast.reset()
                    process = await self.start_hookline(document)
                    run = await self.measure(fast, [process], self.plan.isolation_events)
                rates[case].append(run.rate)
                print(f"  isolation {case}: {run.rate:,.0f}/s", flush=True)
        self.results.scenarios["isolation"] = rates

    async def fanout(self, receiver: Receiver) -> None:
        """(g) one event type subscribed by 10 endpoints."""
        rates: list[float] = []
        for _ in range(self.plan.repetitions):
            endpoints = [
                endpoint_document(f"fan{n}", receiver.url, ["bench.fanout"]) for n in range(10)
            ]
            backlog = ("bench.fanout", self.plan.fanout_events)
            async with self.deployed(endpoints, backlog) as (_, document):
                receiver.reset()
                process = await self.start_hookline(document)
                run = await self.measure(receiver, [process], self.plan.fanout_events * 10)
            rates.append(run.rate)
            print(f"  fan-out x10: {run.rate:,.0f} deliveries/s", flush=True)
        self.results.scenarios["fanout"] = {"deliveries_per_s": rates, "endpoints": 10}


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(values: list[float], unit: str = "", digits: int = 0) -> str:
    low, mid, high = spread(values)
    return f"{mid:,.{digits}f}{unit} ({low:,.{digits}f}-{high:,.{digits}f})"


def summarise(results: Results) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown table, and its rows with pass/fail against the targets."""
    s = results.scenarios
    rows: list[dict[str, Any]] = []
    if "drain" in s:
        rate = {name: [run["rate"] for run in runs] for name, runs in s["drain"].items()}
        ours, naive = statistics.median(rate["hookline"]), statistics.median(rate["naive"])
        concurrent = statistics.median(rate["naive_concurrent"])
        rows.append(
            {
                "scenario": "(a) drain 20k x 1 KiB, deliveries/s",
                "hookline": fmt(rate["hookline"]),
                "baseline": f"naive {fmt(rate['naive'])}",
                "ratio": ours / naive,
                "target": ">= 1.3x naive",
                "ok": ours / naive >= 1.3,
            }
        )
        rows.append(
            {
                "scenario": "(a') same, vs the concurrent naive loop",
                "hookline": fmt(rate["hookline"]),
                "baseline": f"concurrent {fmt(rate['naive_concurrent'])}",
                "ratio": ours / concurrent,
                "target": "(reported)",
                "ok": None,
            }
        )
        runs = s["drain"]["hookline"]
        rss_peak = max(run["rss_peak_mb"] for run in runs)
        rows.append(
            {
                "scenario": "(c) worker RSS peak during (a), MB",
                "hookline": f"{rss_peak:.0f}",
                "baseline": f"naive {max(r['rss_peak_mb'] for r in s['drain']['naive']):.0f}",
                "ratio": None,
                "target": "<= 120 MB",
                "ok": rss_peak <= 120,
            }
        )
        cpu = [run["cpu_s"] / run["deliveries"] * 1000 for run in runs]
        naive_cpu = [
            run["cpu_s"] / run["deliveries"] * 1000 for run in s["drain"]["naive_concurrent"]
        ]
        rows.append(
            {
                "scenario": "(d) worker CPU s per 1,000 deliveries",
                "hookline": f"{statistics.median(cpu):.3f}",
                "baseline": f"concurrent naive {statistics.median(naive_cpu):.3f}",
                "ratio": statistics.median(cpu) / statistics.median(naive_cpu),
                "target": "(reported)",
                "ok": None,
            }
        )
    if "latency" in s:
        lat = s["latency"]
        for queue_type in ("quorum", "classic"):
            p99 = [run["p99_ms"] for run in lat[queue_type]]
            p50 = statistics.median(run["p50_ms"] for run in lat[queue_type])
            p95 = statistics.median(run["p95_ms"] for run in lat[queue_type])
            default = queue_type == "quorum"
            rows.append(
                {
                    "scenario": f"(b) publish->delivered at {lat['rate_per_s']}/s, "
                    f"{queue_type} queues{' (default)' if default else ''}, ms",
                    "hookline": f"p50 {p50:.1f}, p95 {p95:.1f}, p99 {fmt(p99, unit='', digits=1)}",
                    "baseline": "",
                    "ratio": None,
                    "target": "p99 <= 20 ms" if default else "(reported)",
                    "ok": statistics.median(p99) <= 20 if default else None,
                }
            )
    if "soak" in s:
        soak = s["soak"]
        rows.append(
            {
                "scenario": f"(c) RSS across a {soak['seconds'] / 60:.1f}-min soak, MB",
                "hookline": f"{soak['rss_warm_mb']:.1f} -> {soak['rss_end_mb']:.1f}",
                "baseline": "",
                "ratio": 1 + soak["growth"],
                "target": "within 10%",
                "ok": abs(soak["growth"]) <= 0.10,
            }
        )
    if "scale" in s:
        one, two = statistics.median(s["scale"]["one"]), statistics.median(s["scale"]["two"])
        rows.append(
            {
                "scenario": "(e) 2 workers vs 1, 50 ms endpoint, deliveries/s",
                "hookline": f"2: {fmt(s['scale']['two'])}",
                "baseline": f"1: {fmt(s['scale']['one'])}",
                "ratio": two / one,
                "target": ">= 1.8x",
                "ok": two / one >= 1.8,
            }
        )
    if "isolation" in s:
        alone, hung = (
            statistics.median(s["isolation"]["alone"]),
            statistics.median(s["isolation"]["with_hung"]),
        )
        rows.append(
            {
                "scenario": "(f) fast endpoint while another hangs, deliveries/s",
                "hookline": fmt(s["isolation"]["with_hung"]),
                "baseline": f"alone {fmt(s['isolation']['alone'])}",
                "ratio": hung / alone,
                "target": ">= 0.9x",
                "ok": hung / alone >= 0.9,
            }
        )
    if "fanout" in s:
        rows.append(
            {
                "scenario": "(g) fan-out to 10 endpoints, deliveries/s",
                "hookline": fmt(s["fanout"]["deliveries_per_s"]),
                "baseline": "",
                "ratio": None,
                "target": "(reported)",
                "ok": None,
            }
        )
    lines = [
        "| scenario | Hookline, median (min-max) | baseline, same run | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else ""
        verdict = {True: "met", False: "**missed**", None: ""}[row["ok"]]
        lines.append(
            f"| {row['scenario']} | {row['hookline']} | {row['baseline']} | {ratio} | "
            f"{row['target']} | {verdict} |"
        )
    return "\n".join(lines), rows


def plot(results: Results, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = results.scenarios
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if "drain" in s:
        names = ["naive", "naive_concurrent", "hookline"]
        medians = [statistics.median(run["rate"] for run in s["drain"][name]) for name in names]
        left.bar(
            ["naive loop", "concurrent\nnaive loop", "Hookline\n(signed, logged,\nmetrics)"],
            medians,
            color=["#999999", "#bbbbbb", "#2a6fdb"],
        )
        left.set_title("(a) drain 20,000 x 1 KiB to one endpoint")
        left.set_ylabel("deliveries / s (median of runs)")
    if "latency" in s:
        lat = s["latency"]
        labels = ["p50", "p95", "p99"]
        positions = range(len(labels))
        for offset, (queue_type, colour) in enumerate(
            (("quorum", "#2a6fdb"), ("classic", "#8fb3ee"))
        ):
            medians = [
                statistics.median(run[f"{label}_ms"] for run in lat[queue_type]) for label in labels
            ]
            right.bar(
                [p + offset * 0.4 for p in positions],
                medians,
                width=0.4,
                color=colour,
                label=f"{queue_type} queues",
            )
        right.set_xticks([p + 0.2 for p in positions], labels)
        right.axhline(20, color="#cc3333", linestyle="--", label="target p99 20 ms")
        right.set_title(f"(b) publish -> delivered at {lat['rate_per_s']}/s (median of runs)")
        right.set_ylabel("ms")
        right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


async def main() -> int:
    parser = argparse.ArgumentParser(description="Hookline benchmarks (loopback only).")
    parser.add_argument("--quick", action="store_true", help="1 repetition, small loads")
    parser.add_argument("--soak-s", type=float, help="soak length (default 600, quick 60)")
    parser.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    parser.add_argument(
        "--only", nargs="*", choices=["drain", "latency", "soak", "scale", "isolation", "fanout"]
    )
    args = parser.parse_args()
    plan = Plan()
    if args.quick:
        plan = Plan(
            repetitions=1,
            drain_events=5_000,
            latency_s=10,
            soak_s=60,
            scale_events=1_500,
            isolation_events=3_000,
            fanout_events=500,
        )
    if args.soak_s is not None:
        plan.soak_s = args.soak_s
    QUEUE_TYPE[0] = args.queue_type
    only = set(args.only or ["drain", "latency", "soak", "scale", "isolation", "fanout"])
    with tempfile.TemporaryDirectory(prefix="hookline-bench-") as temp:
        workdir = Path(temp)
        bench = Bench(plan, workdir)
        fast = Receiver(workdir / "fast")
        slow = Receiver(workdir / "slow", delay_s=0.05)
        hang = Receiver(workdir / "hang", delay_s=60)
        for receiver in (fast, slow, hang):
            receiver.start()
        bench.results.environment = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "receiver": fast.kind,
            "plan": vars(plan),
            "event_loop": "uvloop" if _has_uvloop() else "asyncio",
            "queue_type": args.queue_type,
        }
        print(f"receiver: {fast.kind}; cpus: {os.cpu_count()}; plan: {vars(plan)}", flush=True)
        try:
            if "drain" in only:
                await bench.drain(fast)
            if "latency" in only:
                await bench.latency(fast)
            if "scale" in only:
                await bench.scale(slow)
            if "isolation" in only:
                await bench.isolation(fast, hang)
            if "fanout" in only:
                await bench.fanout(fast)
            if "soak" in only:
                await bench.soak(fast)
        finally:
            for receiver in (fast, slow, hang):
                receiver.stop()
    table, rows = summarise(bench.results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / f"{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "environment": bench.results.environment,
                "scenarios": bench.results.scenarios,
                "summary": rows,
            },
            indent=2,
        )
    )
    png = RESULTS / f"{stamp}.png"
    plotted = plot(bench.results, png)
    print()
    print(table)
    print(
        f"\nresults: {out}" + (f"\nplot: {png}" if plotted else "\n(matplotlib missing: no plot)")
    )
    return 0


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
