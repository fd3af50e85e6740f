"""Online-first canaries against real components (registry, gateway with real agents,
the deployer as its own process, NATS, PostgreSQL): waves draw online devices, offline
ones are given the release with the last wave as stragglers — not waited for, not
judged, ``stale`` past their deadline — and converge when they return; a canary nobody
can run is refused at once, not after a convergence timeout."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError
from typer.testing import CliRunner, Result

from edgeloop.cli.main import app
from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import RolloutRequested, WavePlan
from edgeloop.devstack.testing import eventually
from tests.deploy_harness import APPROVER_TOKEN, DeployStack
from tests.edge_harness import TOKEN
from tests.modelzoo import classifier

pytestmark = pytest.mark.slow


def _cli(deploy: DeployStack, *args: str) -> Result:
    env = {
        "EDGELOOP_DEPLOYER_API": str(deploy.api.base_url),
        "EDGELOOP_GATEWAY_API": str(deploy.edge.api.base_url),
        "EDGELOOP_MONITOR_API": "http://127.0.0.1:9",  # none here: "not reachable"
        "EDGELOOP_API_TOKEN": TOKEN,
    }
    return CliRunner().invoke(app, list(args), env=env)


async def _stragglers(deploy: DeployStack, rid: str) -> dict[str, dict[str, Any]]:
    return {s["device_id"]: s for s in (await deploy.rollout(rid))["stragglers"]}


async def test_offline_devices_are_stragglers_and_the_rollout_completes_without_them(
    deploy: DeployStack,
) -> None:
    """6 online and 3 offline devices (two enrolled and never started, one stopped), waves
    1, 50 %, 100 %, no failure budget: the early waves draw online devices only, the
    offline ones get the release with the last wave without holding it, are listed as
    stragglers — pending, then stale at their deadline — and one started afterwards
    converges to the release."""
    sel = {"fleet": deploy.unique}
    model = f"iris{deploy.unique}"
    online = await deploy.devices(6, sel)
    never = await deploy.devices(2, sel, prefix="n", start=False)
    gone = (await deploy.devices(1, sel, prefix="g"))[0]
    await deploy.stop_device(gone)
    offline = {*never, gone}
    v1 = await deploy.validated(model, "1", classifier("iris").onnx)

    t0 = time.monotonic()
    code, body = await deploy.start(
        model,
        "1",
        sel,
        waves=[{"count": 1}, {"percent": 50}, {"percent": 100}],
        bake_seconds=0.5,
        device_deadline_seconds=20,
    )
    assert code == 201, body
    assert body["waves_planned"] == [1, 4, 4]
    rid = body["rollout_id"]
    done = await deploy.wait_rollout(rid, "completed", "rolled_back", within=60)
    took = time.monotonic() - t0
    assert done["state"] == "completed", done["reason"]
    assert took < 60, f"{took:.0f} s: waited for the offline devices"  # timeout is 120 s
    waves = done["wave_status"]
    assert [w["state"] for w in waves] == ["succeeded"] * 3
    assert [w["members"] for w in waves] == [1, 4, 1]  # the plan's 1, 5, 9 of online ones
    assert [w["converged"] for w in waves] == [1, 4, 1]
    assert [w["failed"] for w in waves] == [0, 0, 0]
    assert sum(w["deferred"] for w in waves) >= 3  # passed over, and on the last wave
    plan = {d["device_id"]: d for d in done["device_plan"]}
    early = [d for d, row in plan.items() if row["wave"] < 2]
    assert len(early) == 5
    assert set(early) <= set(online)  # early waves: online devices only
    assert {d for d, row in plan.items() if row["straggler"]} == offline
    for device in offline:
        assert plan[device]["outcome"] == "straggler"
    await deploy.running(online, v1)

    # listed as stragglers: pending, with why, until their deadline
    stragglers = await _stragglers(deploy, rid)
    assert set(stragglers) == offline
    assert {s["status"] for s in stragglers.values()} == {"pending"}
    assert stragglers[gone]["text"].startswith("pending (offline since ")
    for device in never:
        assert stragglers[device]["text"] == "pending (never connected)"
    assert done["straggler_counts"] == {"pending": 3}

    # the events say which devices each wave drew and which were stragglers
    started = {
        e["wave"]: e for e in await deploy.events("rollout.wave.started") if e["rollout_id"] == rid
    }
    assert sorted(started) == [0, 1, 2]
    assert [len(started[w]["devices"]) for w in (0, 1, 2)] == [1, 4, 1]
    assert all(set(started[w]["devices"]) <= set(online) for w in (0, 1, 2))
    assert [set(started[w]["stragglers"]) for w in (0, 1, 2)] == [set(), set(), offline]
    completed = [e for e in await deploy.events("rollout.completed") if e["rollout_id"] == rid]
    assert [set(e["stragglers"]) for e in completed] == [offline]

    # silent past the deadline: stale, in the API, `rollout status` and `devices show`
    async def all_stale() -> bool:
        return {s["status"] for s in (await _stragglers(deploy, rid)).values()} == {"stale"}

    await eventually(all_stale, within=40, what="the stragglers stale")
    stragglers = await _stragglers(deploy, rid)
    assert stragglers[gone]["text"].startswith("stale (offline since ")
    status = await asyncio.to_thread(_cli, deploy, "rollout", "status", rid)
    assert status.exit_code == 0, status.output
    assert "COMPLETED with 3 stragglers" in status.output
    assert "3 stale" in status.output
    assert f"{never[0]:24} stale (never connected)" in status.output
    shown = await asyncio.to_thread(_cli, deploy, "devices", "show", gone)
    assert shown.exit_code == 0, shown.output
    assert f"{model}@1 ({rid}, completed): stale (offline since " in shown.output
    resp = await deploy.api.get(f"/v1/devices/{gone}/rollouts")
    assert resp.status_code == 200, resp.text
    assert [(r["rollout_id"], r["status"]) for r in resp.json()["rollouts"]] == [(rid, "stale")]

    # back online, a straggler converges by itself: its desired state waited for it
    await deploy.start_device(never[0])
    await deploy.running([never[0]], v1)
    stragglers = await _stragglers(deploy, rid)
    assert stragglers[never[0]]["status"] == "converged"
    assert {stragglers[d]["status"] for d in offline - {never[0]}} == {"stale"}
    shown = await asyncio.to_thread(_cli, deploy, "devices", "show", never[0])
    assert f"({rid}, completed): converged" in shown.output


async def test_a_canary_no_device_can_run_is_refused_at_once(deploy: DeployStack) -> None:
    """Every device the selector reaches is offline: the rollout is refused at once —
    from the API, and from the bus — saying so, instead of failing a convergence timeout
    later; devices that went offline while the rollout waited at its approval gate fail
    its first wave at once, with the same reason."""
    sel = {"fleet": deploy.unique}
    model = f"iris{deploy.unique}"
    devices = await deploy.devices(3, sel, start=False)
    await deploy.validated(model, "1", classifier("iris").onnx)

    t0 = time.monotonic()
    code, body = await deploy.start(
        model, "1", sel, waves=[{"count": 1}, {"percent": 100}], converge_timeout_seconds=300
    )
    assert code == 409, body
    assert time.monotonic() - t0 < 10
    detail = body["detail"]
    assert f"none of the 3 devices matching fleet={deploy.unique} is online and healthy" in detail
    assert f"{devices[0]}: never connected" in detail
    rows = (await deploy.api.get("/v1/rollouts", params={"model": model})).json()["rollouts"]
    assert rows == []  # nothing admitted

    request = RolloutRequested(
        rollout_id=uuid.uuid4(),
        model=model,
        version="1",
        selector=sel,
        waves=[WavePlan(count=1), WavePlan(percent=100)],
        converge_timeout_seconds=300,
    )
    t0 = time.monotonic()
    await deploy.publish(request)
    refused = await deploy.wait_rollout(str(request.rollout_id), "refused", within=30)
    assert time.monotonic() - t0 < 30
    assert "is online and healthy" in refused["reason"]
    events = await deploy.events("rollout.refused")
    assert str(request.rollout_id) in {e["rollout_id"] for e in events}

    # online at admission, offline by the time the first wave starts (held at a gate)
    for device in devices:
        await deploy.start_device(device)
    resp = await deploy.api.put(f"/v1/policies/{model}", json={"approval": "before_rollout"})
    assert resp.status_code == 200, resp.text
    code, body = await deploy.start(
        model, "1", sel, waves=[{"count": 1}, {"percent": 100}], converge_timeout_seconds=300
    )
    assert code == 201, body
    rid = body["rollout_id"]
    await deploy.wait_rollout(rid, "awaiting_approval")
    for device in devices:
        await deploy.stop_device(device)
    resp = await deploy.api.post(
        f"/v1/rollouts/{rid}/approve",
        json={"reason": "go"},
        headers={"Authorization": f"Bearer {APPROVER_TOKEN}"},
    )
    assert resp.status_code == 200, resp.text
    t0 = time.monotonic()
    done = await deploy.wait_rollout(rid, "rolled_back", "completed", within=60)
    assert time.monotonic() - t0 < 30  # not the 300 s convergence timeout
    assert done["state"] == "rolled_back"
    assert done["reason"].startswith("wave 0: none of the 3 devices is online and healthy")
    assert "offline since" in done["reason"]
    assert [w["state"] for w in done["wave_status"]] == ["failed", "pending"]
    kv = await deploy.edge.js.key_value(s.KV_DESIRED)
    for device in devices:  # nobody was given the release
        with pytest.raises(KeyNotFoundError):
            await kv.get(s.kv_key(device))
