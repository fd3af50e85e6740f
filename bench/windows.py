"""Maintenance windows and disruption budgets on real components (``deployer_rollout``'s
stack: gateway and deployer processes, registry service, N agents in this process).

- ``baseline``: a one-wave rollout of iris@1 to every device, no window, no budget: from
  ``POST /v1/rollouts`` to every device running it; the most devices seen activating
  (downloading or activating) at once.
- ``budget``: iris@2 to the same devices with ``max_unavailable`` (10 % of them) and a
  maintenance window that opens a few seconds after the request (the deployer's clock
  moved by its clock-shift file): from the opening to the first device given the release
  (the engine looks every ``4 * tick`` while it waits), to every device running it, and
  the most devices seen activating at once (the cap).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.deployer_rollout import Stack, _running, stack
from edgeloop.contracts import subjects as s
from edgeloop.contracts.twin import DesiredModel
from edgeloop.edge.fleet import Fleet
from edgeloop.kit.kv import KvMirror

#: agent states between being given a model and running it
BUSY = (2, 3)  # DEVICE_STATE_DOWNLOADING, DEVICE_STATE_ACTIVATING


def _busy(fleet: Fleet) -> int:
    return sum(1 for a in fleet.agents if a.state in BUSY)


async def _follow(st: Stack, digest: str, devices: int) -> tuple[float, int]:
    """Seconds until every device runs ``digest`` (from now), and the most devices seen
    busy at once meanwhile (sampled every 5 ms)."""
    t0 = time.perf_counter()
    most = 0
    while _running(st.fleet, digest) < devices:
        most = max(most, _busy(st.fleet))
        if time.perf_counter() - t0 > 600:
            raise RuntimeError("timed out waiting for the rollout")
        await asyncio.sleep(0.005)
    return time.perf_counter() - t0, most


async def run(
    nats_url: str, dsn: str, registry_url: str, root: Path, *, devices: int
) -> dict[str, Any]:
    """One run of both figures over ``devices`` agents."""
    shift = root / "clock-shift"
    cap = max(1, devices // 10)
    out: dict[str, Any] = {"devices": devices, "max_unavailable": cap}
    async with stack(
        nats_url, dsn, registry_url, root, devices=devices, name="windows",
        clock_shift_file=str(shift), tick_seconds="0.5",
    ) as st:  # fmt: skip
        body = {"selector": {"bench": "windows"}, "waves": [{"percent": 100}], "bake_seconds": 0}
        t0 = time.perf_counter()
        resp = await st.api.post("/v1/rollouts", json={"model": "iris", "version": "1", **body})
        resp.raise_for_status()
        _, most = await _follow(st, st.v1.digest, devices)
        out["baseline"] = {
            "all_running_s": round(time.perf_counter() - t0, 2),
            "most_activating": most,
        }

        # the window opens 3 s from now by the deployer's clock: 02:00 UTC in 3 s
        opens_real = datetime.now(UTC) + timedelta(seconds=3)
        opening = (datetime.now(UTC) + timedelta(days=1)).replace(
            hour=2, minute=0, second=0, microsecond=0
        )
        shift.write_text(f"{(opening - opens_real).total_seconds():.3f}")
        first: list[float] = []

        def on_desired(key: str, revision: int, value: bytes | None) -> None:
            if value and not first and DesiredModel.from_bytes(value).version == "2":
                first.append(time.perf_counter())

        mirror = KvMirror(await st.js.key_value(s.KV_DESIRED), on_desired, name="bench-win")
        await mirror.start()
        resp = await st.api.post(
            "/v1/rollouts",
            json={
                "model": "iris",
                "version": "2",
                "window": "daily 02:00-03:00 UTC",
                "max_unavailable": cap,
                **body,
            },
        )
        resp.raise_for_status()
        await asyncio.sleep(max(0.0, (opens_real - datetime.now(UTC)).total_seconds()))
        t_open = time.perf_counter()
        took, most = await _follow(st, st.v2.digest, devices)
        await mirror.stop()
        out["budget"] = {
            "opening_to_first_write_s": round(first[0] - t_open, 2) if first else None,
            "opening_to_all_running_s": round(took, 2),
            "most_activating": most,
        }
    return out
