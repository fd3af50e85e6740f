"""Deployer benchmarks on real components: the gateway and the deployer as their own
processes, the registry service, N real agents in this process (one onnxruntime session
shared), NATS JetStream and PostgreSQL.

- ``wave``: one wave to every device: from ``POST /v1/rollouts`` (which queues
  ``rollout.requested``) to every device running the image, and to the rollout's
  ``completed``.
- ``rollback``: with a wave baking on every device, a failing canary verdict is published;
  the time until every device's desired state is its previous one again (target ≤ 2 s),
  and until every device runs it.

For scale: AWS IoT jobs roll out to at most 1,000 devices a minute (maximum rollout rate).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.js import JetStreamContext

from bench.edge_gateway import TOKEN as GATEWAY_TOKEN
from bench.edge_gateway import Gateway
from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import CanaryVerdict, Verdict
from edgeloop.contracts.twin import DesiredModel
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import api_up, eventually, publish_event
from edgeloop.edge.fleet import Fleet, FleetOptions
from edgeloop.kit.kv import KvMirror
from edgeloop.registry.app import build as build_registry
from edgeloop.registry.config import RegistrySettings
from tests.deploy_harness import deployer_process, make_validated
from tests.edge_harness import TOKEN, Image
from tests.modelzoo import classifier


def _running(fleet: Fleet, digest: str) -> int:
    return sum(
        1
        for a in fleet.agents
        if a.running is not None and a.running.installed.manifest_digest == digest
    )


async def _until(check: Any, what: str, within: float = 600) -> float:
    """Seconds until ``check()`` is true (polled every 20 ms)."""
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > within:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return time.perf_counter() - t0


async def _start(api: httpx.AsyncClient, version: str, *, bake: float) -> str:
    """A one-wave rollout of iris@``version`` to every benchmark device; its id."""
    resp = await api.post(
        "/v1/rollouts",
        json={
            "model": "iris",
            "version": version,
            "selector": {"bench": "deploy"},
            "waves": [{"percent": 100}],
            "bake_seconds": bake,
            "converge_timeout_seconds": 600,
        },
    )
    resp.raise_for_status()
    return str(resp.json()["rollout_id"])


@dataclass
class Stack:
    """What a deployer benchmark drives: the deployer's API, the agents, the bus, and
    ``iris`` versions 1 and 2 validated."""

    api: httpx.AsyncClient
    fleet: Fleet
    js: JetStreamContext
    v1: Image
    v2: Image
    stop: asyncio.Event
    fleet_task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def stack(
    nats_url: str,
    dsn: str,
    registry_url: str,
    root: Path,
    *,
    devices: int,
    name: str = "deploy",
    **deployer_settings: str,
) -> AsyncIterator[Stack]:
    """The gateway and the deployer as processes, the registry service, ``devices``
    agents labelled ``bench=<name>`` connected, two validated versions."""
    gw = Gateway(root / f"gw-{name}", nats_url, dsn, registry_url)
    gw.env["EDGELOOP_GATEWAY_API_TOKENS"] = f"{GATEWAY_TOKEN},{TOKEN}"
    await gw.start()
    registry_port, deployer_port = free_port(), free_port()
    registry = build_registry(
        RegistrySettings(
            nats_url=nats_url,
            database_url=dsn,
            oci_registry_url=registry_url,
            api_tokens=TOKEN,
            api_port=registry_port,
            log_level="WARNING",
        )
    )
    deployer = deployer_process(
        root,
        nats_url=nats_url,
        dsn=dsn,
        registry_url=registry_url,
        registry_api=f"http://127.0.0.1:{registry_port}",
        gateway_api=gw.api,
        api_port=deployer_port,
        instance=f"bench-deployer-{name}",
        token=TOKEN,
        log_level="WARNING",
        **deployer_settings,
    )
    deployer.env["EDGELOOP_LOG_LEVEL"] = "WARNING"
    fleet = Fleet(
        FleetOptions(
            devices=devices,
            gateway_api=gw.api,
            token=GATEWAY_TOKEN,
            state_dir=root / f"fleet-{name}",
            prefix=name[:2],
            labels={"bench": name},
            infer_seconds=3600,
            telemetry_seconds=3600,
        )
    )
    stop = asyncio.Event()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        async with (
            registry.running(),
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{registry_port}",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            ) as reg_api,
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{deployer_port}",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            ) as api,
        ):
            deployer.start()
            await asyncio.to_thread(fleet.prepare)
            fleet_task = asyncio.create_task(fleet.run(stop, None))
            await _until(lambda: fleet.counts()["connected"] >= devices, "devices connected")
            await eventually(lambda: api_up(api), within=60, what="deployer API")
            onnx = classifier("iris").onnx
            repo = f"bench/images/iris-{name}"
            v1 = await make_validated(js, reg_api, registry_url, repo, "iris", "1", onnx)
            v2 = await make_validated(js, reg_api, registry_url, repo, "iris", "2", onnx)
            yield Stack(api, fleet, js, v1, v2, stop, fleet_task)
            stop.set()
            await fleet_task
    finally:
        stop.set()
        await nc.close()
        deployer.terminate()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(deployer.proc.wait, 20)  # type: ignore[union-attr]
        deployer.kill()
        await gw.stop()


async def run(
    nats_url: str, dsn: str, registry_url: str, root: Path, *, devices: int
) -> dict[str, Any]:
    """Both figures over ``devices`` agents."""
    out: dict[str, Any] = {"devices": devices}
    async with stack(nats_url, dsn, registry_url, root, devices=devices) as st:
        api, fleet, js, v1, v2 = st.api, st.fleet, st.js, st.v1, st.v2
        # one wave to every device
        t0 = time.perf_counter()
        rid = await _start(api, "1", bake=0)
        admitted = time.perf_counter() - t0
        all_running = await _until(lambda: _running(fleet, v1.digest) >= devices, "v1") + (admitted)

        async def completed() -> bool:
            return bool((await api.get(f"/v1/rollouts/{rid}")).json()["state"] == "completed")

        await eventually(completed, within=120, what="rollout completed")
        out["wave"] = {
            "admitted_s": round(admitted, 2),
            "all_running_s": round(all_running, 2),
            "completed_s": round(time.perf_counter() - t0, 2),
            "devices_per_minute": round(devices / all_running * 60),
        }

        # a baking wave of v2, then a failing verdict
        rid = await _start(api, "2", bake=3600)
        await _until(lambda: _running(fleet, v2.digest) >= devices, "v2")

        async def baking() -> bool:
            body = (await api.get(f"/v1/rollouts/{rid}")).json()
            return bool(body["wave_status"][0]["state"] == "baking")

        await eventually(baking, within=120, what="wave baking")
        restored: set[str] = set()

        def on_desired(key: str, revision: int, value: bytes | None) -> None:
            if value:
                doc = DesiredModel.from_bytes(value)
                if doc.manifest_digest == v1.digest and doc.explicit_rollback:
                    restored.add(key)

        mirror = KvMirror(await js.key_value(s.KV_DESIRED), on_desired, name="bench")
        await mirror.start()
        verdict = CanaryVerdict(
            rollout_id=uuid.UUID(rid),
            model="iris",
            version="2",
            wave=0,
            verdict=Verdict.FAIL,
            reasons=["benchmark: injected failing verdict"],
        )
        t0 = time.perf_counter()
        await publish_event(js, verdict)
        desired_s = await _until(lambda: len(restored) >= devices, "desired restored")
        running_s = await _until(lambda: _running(fleet, v1.digest) >= devices, "back on v1")
        await mirror.stop()
        body = (await api.get(f"/v1/rollouts/{rid}")).json()
        finished = datetime.fromisoformat(body["finished_at"])
        out["rollback"] = {
            # the deployer's own clock: verdict published → every write done and
            # the rollout committed rolled_back
            "deployer_restored_s": round((finished - verdict.occurred_at).total_seconds(), 2),
            # as seen by a KV watch in the agents' process (it shares their CPU)
            "desired_restored_s": round(desired_s, 2),
            "all_running_previous_s": round(desired_s + running_s, 2),
        }
    return out
