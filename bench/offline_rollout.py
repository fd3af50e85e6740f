"""A rollout with 30 % of its devices offline against the same rollout with all online
(issue 17's figure), on ``deployer_rollout``'s stack: gateway and deployer processes, the
registry service, N agents in this process.

- ``all_online``: iris@1 in waves of 2 devices, 50 %, 100 % (bake 0) to every device:
  seconds from ``POST /v1/rollouts`` to the rollout ``completed``.
- ``offline_30``: iris@2 the same way after 30 % of the devices dropped their link (long
  before: past the deployer's offline grace): seconds to ``completed`` (with those devices
  as stragglers), and how many stragglers it lists. Online-first waves draw only online
  devices, so the offline ones cannot hold a wave; before issue 17 the canary drew an
  offline device, waited its convergence timeout and rolled the release back.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import httpx

from bench.deployer_rollout import _until, stack

WAVES = [{"count": 2}, {"percent": 50}, {"percent": 100}]
#: the deployer's offline grace in this benchmark: a device silent longer is offline
GRACE_S = 3.0


async def _completed(api: httpx.AsyncClient, version: str) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    resp = await api.post(
        "/v1/rollouts",
        json={
            "model": "iris",
            "version": version,
            "selector": {"bench": "offline"},
            "waves": WAVES,
            "bake_seconds": 0,
            "converge_timeout_seconds": 600,
        },
    )
    resp.raise_for_status()
    rid = resp.json()["rollout_id"]
    body: dict[str, Any] = {}
    while True:
        body = (await api.get(f"/v1/rollouts/{rid}")).json()
        if body["state"] not in ("pending", "running"):
            break
        if time.perf_counter() - t0 > 600:
            raise RuntimeError(f"rollout {rid} did not finish: {body['state']}")
        await asyncio.sleep(0.05)
    if body["state"] != "completed":
        raise RuntimeError(f"rollout {rid} ended {body['state']}: {body.get('reason')}")
    return time.perf_counter() - t0, body


async def run(
    nats_url: str, dsn: str, registry_url: str, root: Path, *, devices: int, seed: int
) -> dict[str, Any]:
    """Both rollouts over ``devices`` agents, the offline share drawn with ``seed``."""
    async with stack(
        nats_url, dsn, registry_url, root, devices=devices, name="offline",
        offline_grace_seconds=str(GRACE_S), tick_seconds="0.2",
    ) as st:  # fmt: skip
        online_s, _ = await _completed(st.api, "1")
        away = random.Random(seed).sample(st.fleet.agents, round(devices * 0.3))
        for agent in away:
            agent.go_offline(3600)
        await _until(
            lambda: st.fleet.counts()["connected"] <= devices - len(away), "devices offline"
        )
        await asyncio.sleep(GRACE_S + 1)  # offline for longer than the grace
        offline_s, body = await _completed(st.api, "2")
        stragglers = body.get("stragglers") or []
        return {
            "devices": devices,
            "offline": len(away),
            "all_online_s": round(online_s, 2),
            "offline_30_s": round(offline_s, 2),
            "stragglers": len(stragglers) if isinstance(stragglers, list) else stragglers,
        }
