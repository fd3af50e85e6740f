"""What per-service NATS permissions cost: JetStream publishes of telemetry batches as
the gateway's user (its permissions checked on every publish) against the admin (no
permissions block) on the same server, in alternating runs."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import nats

from edgeloop.contracts import subjects as s
from edgeloop.devstack.nats_auth import ADMIN, NatsAuth
from edgeloop.devstack.servers import NatsServer
from edgeloop.kit.bus import declare_topology

#: small messages, where a check made on every publish weighs the most
BATCH_BYTES = 1024
#: publishes awaited at once (as the gateway's concurrent device streams do)
WINDOW = 256


async def _publish(url: str, user: str, password: str, count: int) -> float:
    """Publishes per second: ``count`` acknowledged publishes, ``WINDOW`` in flight."""
    nc = await nats.connect(url, user=user, password=password)
    js = nc.jetstream()
    payload = b"x" * BATCH_BYTES
    subjects = [s.telemetry_subject("bench", f"device-{i}") for i in range(64)]
    try:
        t0 = time.perf_counter()
        for start in range(0, count, WINDOW):
            await asyncio.gather(
                *(
                    js.publish(subjects[i % len(subjects)], payload)
                    for i in range(start, min(start + WINDOW, count))
                )
            )
        return count / (time.perf_counter() - t0)
    finally:
        await nc.close()


async def run(root: Path, *, count: int = 20_000, runs: int = 5) -> dict[str, Any]:
    """Median publishes/s as the gateway and as the admin, and each run's figures."""
    auth = NatsAuth.platform()
    server = NatsServer(root / "nats-auth", auth=auth).start()
    try:
        admin, gateway = auth.user(ADMIN), auth.user("gateway")
        nc = await nats.connect(server.url, user=admin.name, password=admin.password)
        await declare_topology(nc.jetstream())
        await nc.close()
        as_gateway, as_admin = [], []
        for _ in range(runs):
            as_gateway.append(await _publish(server.url, gateway.name, gateway.password, count))
            as_admin.append(await _publish(server.url, admin.name, admin.password, count))
    finally:
        server.stop()
    return {
        "batch_bytes": BATCH_BYTES,
        "publishes_per_run": count,
        "gateway_user_publishes_per_s": round(statistics.median(as_gateway)),
        "admin_no_permissions_publishes_per_s": round(statistics.median(as_admin)),
        "runs_gateway": [round(x) for x in as_gateway],
        "runs_admin": [round(x) for x in as_admin],
    }
