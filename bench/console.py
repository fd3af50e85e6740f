"""Console benchmarks on real components: the registry, the gateway with two real agents,
the deployer process, the monitor and the console (uvicorn, in this process), on NATS
JetStream and PostgreSQL.

- ``pages``: time to load each page (p50/p95 of ``--requests`` loads) with 10,000 devices
  and 100 rollouts in the database; baseline: the one API call behind each page,
  made directly, in the same run.
- ``sse``: from a wave's transition (first seen by polling the deployer's API every
  20 ms) to the live page's event carrying it (the console's server-sent events).

The devices are rows of the gateway's table (enrolled, offline); the rollouts are copies
of one real completed rollout (its waves and device plan too): what the pages read is
then what 10,000 enrolled devices and 100 rollouts leave behind.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from edgeloop.console.app import serving
from edgeloop.devstack.servers import free_port
from tests.deploy_harness import console_beside, deploy_stack, monitor_beside
from tests.modelzoo import classifier

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_WAVE = re.compile(r'data-wave="(\d+)" data-state="([a-z_]+)"')


async def _columns(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'deployer' AND table_name = $1 ORDER BY ordinal_position",
        table,
    )
    return [r["column_name"] for r in rows]


async def _seed(dsn: str, devices: int, rollouts: int, template: str) -> None:
    """``devices`` enrolled, offline devices and ``rollouts - 1`` copies of rollout
    ``template`` (with its waves and device plan)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO gateway.devices (device_id, labels, fingerprint, cert_serial,
                   cert_not_after, last_seen)
               SELECT 'bench-' || lpad(i::text, 5, '0'),
                      jsonb_build_object('site', 'site-' || (i % 20), 'bench', 'seeded'),
                      md5(i::text), i, now() + interval '365 days',
                      now() - make_interval(secs => i)
               FROM generate_series(1, $1) AS i""",
            devices,
        )
        tables = {
            t: ", ".join(c for c in await _columns(conn, t) if c != "rollout_id")
            for t in ("rollouts", "waves", "rollout_devices")
        }
        for _ in range(rollouts - 1):
            copy = uuid.uuid4()
            for table, listed in tables.items():
                await conn.execute(
                    f"INSERT INTO deployer.{table} (rollout_id, {listed}) "
                    f"SELECT $2, {listed} FROM deployer.{table} WHERE rollout_id = $1",
                    uuid.UUID(template),
                    copy,
                )
    finally:
        await conn.close()


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1), "p95_ms": round(p95 * 1000, 1)}


async def _sign_in(client: httpx.AsyncClient, token: str) -> None:
    form = await client.get("/signin")
    match = _CSRF.search(form.text)
    assert match, form.text
    resp = await client.post("/signin", data={"token": token, "csrf": match.group(1)})
    assert resp.status_code == 303, resp.text


async def _sse_latency(
    client: httpx.AsyncClient, api: httpx.AsyncClient, rollout_id: str
) -> list[float]:
    """Per wave transition seen both ways: SSE event time minus first API sighting."""
    by_api: dict[tuple[int, str], float] = {}
    by_sse: dict[tuple[int, str], float] = {}
    done = asyncio.Event()

    async def poll() -> None:
        while not done.is_set():
            body = (await api.get(f"/v1/rollouts/{rollout_id}")).json()
            now = time.perf_counter()
            for w in body["wave_status"]:
                by_api.setdefault((w["wave"], w["state"]), now)
            if body["state"] in ("completed", "rolled_back", "aborted"):
                await asyncio.sleep(1)  # the page's last event
                done.set()
            await asyncio.sleep(0.02)

    async def listen() -> None:
        async with client.stream("GET", f"/rollouts/{rollout_id}/live") as stream:
            async for line in stream.aiter_lines():
                now = time.perf_counter()
                for wave, state in _WAVE.findall(line):
                    by_sse.setdefault((int(wave), state), now)
                if done.is_set():
                    return

    listener = asyncio.create_task(listen())
    await poll()
    listener.cancel()
    return [by_sse[k] - by_api[k] for k in by_sse if k in by_api and by_sse[k] >= by_api[k]]


async def run(
    nats_url: str,
    dsn: str,
    registry_url: str,
    root: Path,
    *,
    devices: int = 10_000,
    rollouts: int = 100,
    runs: int = 3,
    requests: int = 30,
) -> dict[str, Any]:
    """The page loads and the SSE latency (see the module)."""
    unique = uuid.uuid4().hex[:8]
    async with deploy_stack(nats_url, dsn, registry_url, root, unique) as st:
        monitor_port = free_port()
        async with monitor_beside(st, nats_url, dsn, registry_url, monitor_port).running():
            live = await st.devices(2, {"bench": "live"})
            model = f"bench{unique}"
            await st.validated(model, "1", classifier("iris").onnx)
            code, body = await st.start(model, "1", {"bench": "live"}, waves=[{"percent": 100}])
            assert code == 201, body
            await st.wait_rollout(body["rollout_id"], "completed")
            await _seed(dsn, devices, rollouts, body["rollout_id"])
            token = (
                await st.registry.post("/api/v1/tokens", json={"name": "bench", "role": "operator"})
            ).json()["token"]
            settings = console_beside(st, monitor_port)
            pages = {
                "overview": ("/", "gateway", "/v1/device-counts"),
                "rollouts": ("/rollouts", "deployer", "/v1/rollouts?limit=100"),
                "rollout": (f"/rollouts/{body['rollout_id']}", "deployer",
                            f"/v1/rollouts/{body['rollout_id']}"),
                "devices": ("/devices", "gateway", "/v1/devices?limit=1000"),
                "version": (f"/models/{model}/versions/1", "registry",
                            f"/api/v1/models/{model}/versions/1"),
            }  # fmt: skip
            apis = {"gateway": st.edge.api, "deployer": st.api, "registry": st.registry}
            out: dict[str, Any] = {"devices": devices, "rollouts": rollouts, "runs": []}
            async with (
                serving(settings) as url,
                httpx.AsyncClient(base_url=url, timeout=60) as client,
            ):
                await _sign_in(client, token)
                for i in range(runs):
                    one: dict[str, Any] = {"run": i + 1}
                    for name, (path, service, baseline) in pages.items():
                        page_t, api_t = [], []
                        for _ in range(requests):
                            t0 = time.perf_counter()
                            resp = await client.get(path)
                            page_t.append(time.perf_counter() - t0)
                            assert resp.status_code == 200, (path, resp.status_code)
                            t0 = time.perf_counter()
                            await apis[service].get(baseline)
                            api_t.append(time.perf_counter() - t0)
                        one[name] = {"page": _spread(page_t), "api_baseline": _spread(api_t)}
                    code, rb = await st.start(
                        model, "1", {"bench": "live"},
                        waves=[{"count": 1}, {"percent": 100}], bake_seconds=1,
                    )  # fmt: skip
                    assert code == 201, rb
                    lat = await _sse_latency(client, st.api, rb["rollout_id"])
                    one["sse_ms"] = sorted(round(x * 1000, 1) for x in lat)
                    out["runs"].append(one)
                    print(one, flush=True)
            for agent in list(st.agents.values()):
                await st.edge.stop_agent(agent)
            del live
    return out
