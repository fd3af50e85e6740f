"""Alarm latency: drift starts at a known instant in a stream of telemetry (20 batches of
256 inferences a second, from the model's reference profile); how long until
``alarm.raised`` is on the bus. The monitor (window ``W`` seconds, grace 0.5 s) and the
registry run in this process on real NATS and PostgreSQL. Target: ≤ W + 1 s.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import numpy as np

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import Histogram, TelemetryBatch
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import api_up, eventually, publish_event
from edgeloop.edge.sources import Drift, SimulatedSensor
from edgeloop.monitor.app import build as build_monitor
from edgeloop.monitor.config import MonitorSettings
from edgeloop.registry.app import build as build_registry
from edgeloop.registry.config import RegistrySettings
from tests.deploy_harness import register_version
from tests.edge_harness import TOKEN
from tests.modelzoo import classifier


async def run(
    nats_url: str, dsn: str, registry_url: str, root: Path, *, window: float = 5.0, runs: int = 3
) -> dict[str, Any]:
    """Latency of ``runs`` drift onsets (each on a fresh model)."""
    del root
    common: dict[str, Any] = {
        "nats_url": nats_url,
        "database_url": dsn,
        "oci_registry_url": registry_url,
    }
    reg_port, mon_port = free_port(), free_port()
    registry = build_registry(
        RegistrySettings(**common, api_tokens=TOKEN, api_port=reg_port, log_level="WARNING")
    )
    monitor = build_monitor(
        MonitorSettings(
            **common,
            api_tokens=TOKEN,
            api_port=mon_port,
            registry_api=f"http://127.0.0.1:{reg_port}",
            registry_token=TOKEN,
            window_seconds=window,
            grace_seconds=0.5,
            evaluate_seconds=0.1,
            log_level="WARNING",
        )
    )
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    raised: dict[str, float] = {}

    async def on_alarm(msg: Any) -> None:
        model = msg.data.decode().split('"model":"', 1)[1].split('"', 1)[0]
        raised.setdefault(model, time.perf_counter())

    await nc.subscribe(s.ALARM_RAISED, cb=on_alarm)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    latencies = []
    m = classifier("iris")
    async with (
        registry.running(),
        monitor.running(),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{reg_port}", headers=headers) as reg,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{mon_port}", headers=headers) as api,
    ):
        await eventually(lambda: api_up(reg), what="registry API")
        await eventually(lambda: api_up(api), what="monitor API")
        for r in range(runs):
            model = f"alarm{r}"
            profile = await register_version(reg, model, "1", m.onnx, m.reference)
            assert profile is not None
            edges = [np.asarray(f["edges"]) for f in profile["features"]]
            names = [f["name"] for f in profile["features"]]
            sensor = SimulatedSensor.from_profile(profile, seed=r)
            start = time.perf_counter()
            onset = start + 2 * window + (r * 0.37 % 1) * window  # somewhere in a window
            while model not in raised and time.perf_counter() - start < 10 * window:
                now = time.perf_counter()
                if now >= onset and sensor.drift is None:
                    sensor.drift = Drift(feature=2, shift=3.0)
                    sensor.drift_col = 2
                    onset = now
                rows = np.asarray(sensor.read(256), dtype=np.float64)
                at = datetime.now(UTC)
                batch = TelemetryBatch(
                    model=model,
                    version="1",
                    device_id=f"dev-{int(now * 20) % 10}",
                    window_start=at,
                    window_end=at,
                    count=256,
                    feature_names=names,
                    feature_histograms=[
                        Histogram(
                            edges=e.tolist(),
                            counts=np.bincount(
                                np.searchsorted(e, rows[:, j], side="left"), minlength=len(e) + 1
                            ).tolist(),
                        )
                        for j, e in enumerate(edges)
                    ],
                )
                await publish_event(js, batch, subject=batch.bus_subject())
                await asyncio.sleep(max(0.0, 0.05 - (time.perf_counter() - now)))
            if model in raised:
                latencies.append(raised[model] - onset)
    await nc.close()
    return {
        "window_s": window,
        "grace_s": 0.5,
        "onsets": runs,
        "alarm_latency_s": [round(x, 2) for x in latencies],
        "max_s": round(max(latencies), 2) if latencies else None,
        "target_s": window + 1,
    }
