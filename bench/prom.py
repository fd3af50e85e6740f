"""What exporting NATS's figures costs a scrape: Prometheus's scrape of
``edgeloop.kit.natsmetrics`` (``/metrics`` on the kit's health endpoint: ``/varz`` and
``/jsz`` with every stream and consumer read, parsed and rendered) against the raw reads
of ``/varz`` and ``/jsz`` alone, on one server carrying the platform's streams and
``consumers`` durable consumers, in alternating runs."""

from __future__ import annotations

import asyncio
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats

from edgeloop.devstack.servers import NatsServer, free_port
from edgeloop.kit.bus import declare_topology
from edgeloop.kit.natsmetrics import NatsMetricsSettings, serve

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> int:
    with _opener.open(url, timeout=10) as resp:
        return len(resp.read())


def _timed(urls: list[str], scrapes: int) -> tuple[float, int]:
    """Milliseconds per scrape (all ``urls`` read once), and the bytes of one."""
    size = sum(_get(u) for u in urls)  # warm
    t0 = time.perf_counter()
    for _ in range(scrapes):
        for url in urls:
            _get(url)
    return (time.perf_counter() - t0) * 1000 / scrapes, size


async def run(
    root: Path, *, consumers: int = 100, scrapes: int = 50, runs: int = 3
) -> dict[str, Any]:
    """Median, min and max ms per scrape, exporter and raw reads, and each run's."""
    server = NatsServer(root / "nats").start()
    stop = asyncio.Event()
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await declare_topology(js)
        for i in range(consumers):
            await js.add_consumer("LIFECYCLE", durable_name=f"bench-{i}")
        await nc.close()
        port = free_port()
        settings = NatsMetricsSettings(urls=server.monitor_url, http_port=port)
        exporter = asyncio.create_task(serve(settings, stop))
        metrics = f"http://127.0.0.1:{port}/metrics"
        while True:
            try:
                await asyncio.to_thread(_get, metrics)
                break
            except OSError:
                await asyncio.sleep(0.1)
        raw = [
            f"{server.monitor_url}/varz",
            f"{server.monitor_url}/jsz?accounts=true&streams=true&consumers=true",
        ]
        exported, baseline = [], []
        for _ in range(runs):
            ms, exported_bytes = await asyncio.to_thread(_timed, [metrics], scrapes)
            exported.append(ms)
            ms, raw_bytes = await asyncio.to_thread(_timed, raw, scrapes)
            baseline.append(ms)
        stop.set()
        await exporter
    finally:
        stop.set()
        server.stop()

    def spread(xs: list[float]) -> dict[str, float]:
        return {
            "min": round(min(xs), 2),
            "median": round(statistics.median(xs), 2),
            "max": round(max(xs), 2),
        }

    return {
        "consumers": consumers,
        "scrapes_per_run": scrapes,
        "exporter_ms_per_scrape": spread(exported),
        "raw_varz_jsz_ms": spread(baseline),
        "exporter_bytes": exported_bytes,
        "raw_bytes": raw_bytes,
        "runs_exporter_ms": [round(x, 2) for x in exported],
        "runs_raw_ms": [round(x, 2) for x in baseline],
    }
