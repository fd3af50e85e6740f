"""The health endpoint over real HTTP."""

from __future__ import annotations

import httpx

from edgeloop.kit.http import HealthServer


async def test_health_ready_and_metrics() -> None:
    state = {"ok": True}

    async def check() -> tuple[bool, str]:
        return state["ok"], "" if state["ok"] else "database down"

    server = HealthServer("127.0.0.1", 0, {"db": check})
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json() == {"ready": True, "checks": {"db": "ok"}}
            state["ok"] = False
            not_ready = await client.get("/readyz")
            assert not_ready.status_code == 503
            assert not_ready.json()["checks"]["db"] == "failing: database down"
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert "python_info" in metrics.text
            assert (await client.get("/nope")).status_code == 404
    finally:
        await server.stop()
