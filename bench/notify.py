"""Webhook delivery: the notifier (in this process, on real NATS and PostgreSQL) against a
real HTTP receiver (uvicorn, same process).

- latency: ``alarm.raised`` published → its signed POST at the receiver, one at a time;
- burst: ``events`` alarms published at once → all received (deliveries per second),
  against the same run's baseline: the same number of signed POSTs of the same size sent
  straight from one httpx client with the notifier's concurrency (the HTTP floor, no bus,
  no database).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import nats

from edgeloop.contracts.webhooks import signed_headers
from edgeloop.devstack.testing import api_up, eventually, publish_event
from edgeloop.notifier.app import build
from tests.edge_harness import TOKEN
from tests.notify_harness import Receiver, alarm, notifier_settings, receiving

SECRET = "bench-receiver-secret-0123456789"


async def _until(receiver: Receiver, count: int) -> None:
    while len(receiver.got) < count:
        await asyncio.sleep(0.002)


async def _direct(url: str, body: bytes, events: int, concurrency: int) -> None:
    """The baseline: ``events`` signed POSTs of ``body``, ``concurrency`` at once."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=10) as client:

        async def post() -> None:
            async with gate:
                resp = await client.post(url, content=body, headers=signed_headers(SECRET, body))
                resp.raise_for_status()

        await asyncio.gather(*(post() for _ in range(events)))


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 4),
        "median": round(statistics.median(values), 4),
        "max": round(max(values), 4),
    }


async def run(
    nats_url: str, dsn: str, registry_url: str, root: Path, *, runs: int = 3, events: int = 500
) -> dict[str, Any]:
    """Latency of 20 single alarms and ``runs`` bursts of ``events``, with the baseline."""
    del registry_url, root
    settings = notifier_settings(nats_url, dsn, log_level="WARNING")
    port = settings.api_port
    svc = build(settings)
    receiver = Receiver()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    latencies: list[float] = []
    notifier_rates: list[float] = []
    baseline_rates: list[float] = []
    try:
        async with (
            receiving(receiver),
            svc.running(),
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as api,
        ):
            await eventually(lambda: api_up(api), what="the notifier API")
            resp = await api.post(
                "/v1/subscriptions",
                json={"url": receiver.url, "events": ["alarm.raised"], "secret": SECRET},
            )
            resp.raise_for_status()
            await asyncio.sleep(0.05)  # created_at strictly before the first event
            for _ in range(20):
                seen = len(receiver.got)
                t0 = time.perf_counter()
                await publish_event(js, alarm())
                await _until(receiver, seen + 1)
                latencies.append(time.perf_counter() - t0)
            body = receiver.got[-1][1]
            for _ in range(runs):
                seen = len(receiver.got)
                alarms = [alarm() for _ in range(events)]
                t0 = time.perf_counter()
                await asyncio.gather(*(publish_event(js, a) for a in alarms))
                await _until(receiver, seen + events)
                notifier_rates.append(events / (time.perf_counter() - t0))

                seen = len(receiver.got)
                t0 = time.perf_counter()
                await _direct(receiver.url, body, events, settings.concurrency)
                await _until(receiver, seen + events)
                baseline_rates.append(events / (time.perf_counter() - t0))
    finally:
        await nc.close()
    return {
        "latency_seconds": _summary(latencies),
        "burst_events": events,
        "notifier_deliveries_per_second": _summary(notifier_rates),
        "baseline_direct_posts_per_second": _summary(baseline_rates),
        "concurrency": settings.concurrency,
        "runs": runs,
    }
