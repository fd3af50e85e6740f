"""The deployer against real components: the registry service, the gateway with real
agents, the deployer as its own process, NATS JetStream and PostgreSQL (private to each
test)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from edgeloop.cli.main import app
from edgeloop.contracts.events import CanaryVerdict, RolloutRequested, Verdict, WavePlan
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import eventually
from edgeloop.devstack.up import ServiceProcess
from edgeloop.edge.agent import Faults
from tests.deploy_harness import APPROVER_TOKEN, DeployStack
from tests.edge_harness import TOKEN
from tests.modelzoo import classifier, failing_model

pytestmark = pytest.mark.slow


def _model(st: DeployStack) -> str:
    return f"iris{st.unique}"


async def _baseline(st: DeployStack, devices: list[str], selector: dict[str, str]) -> object:
    """Every device on v1, through a one-wave rollout."""
    v1 = await st.validated(_model(st), "1", classifier("iris").onnx)
    code, body = await st.start(_model(st), "1", selector, waves=[{"percent": 100}], bake_seconds=0)
    assert code == 201, body
    await st.wait_rollout(body["rollout_id"], "completed")
    await st.running(devices, v1)
    return v1


async def test_rollout_in_three_waves_reaches_every_device_once(deploy: DeployStack) -> None:
    sel = {"fleet": deploy.unique}
    devices = await deploy.devices(6, sel)
    v1 = await deploy.validated(_model(deploy), "1", classifier("iris").onnx)
    code, body = await deploy.start(
        _model(deploy),
        "1",
        sel,
        waves=[{"count": 1}, {"percent": 50}, {"percent": 100}],
        bake_seconds=0.5,
    )
    assert code == 201, body
    assert body["waves_planned"] == [1, 2, 3]
    done = await deploy.wait_rollout(body["rollout_id"], "completed", "rolled_back")
    assert done["state"] == "completed", done["reason"]
    await deploy.running(devices, v1)
    assert [w["state"] for w in done["wave_status"]] == ["succeeded"] * 3
    assert [w["converged"] for w in done["wave_status"]] == [1, 2, 3]
    # the plan is the stable hash order, the same for every rollout of these devices
    plan = [d["device_id"] for d in done["device_plan"]]
    assert sorted(plan) == sorted(devices)
    code, again = await deploy.start(
        _model(deploy),
        "1",
        sel,
        waves=[{"count": 1}, {"percent": 50}, {"percent": 100}],
        bake_seconds=0,
    )
    assert code == 201, again
    again_plan = (await deploy.rollout(again["rollout_id"]))["device_plan"]
    assert [d["device_id"] for d in again_plan] == plan
    await deploy.wait_rollout(again["rollout_id"], "completed")

    rid = body["rollout_id"]
    started = [e for e in await deploy.events("rollout.wave.started") if e["rollout_id"] == rid]
    succeeded = [e for e in await deploy.events("rollout.wave.succeeded") if e["rollout_id"] == rid]
    completed = [e for e in await deploy.events("rollout.completed") if e["rollout_id"] == rid]
    assert sorted(e["wave"] for e in started) == [0, 1, 2]
    assert sorted(e["wave"] for e in succeeded) == [0, 1, 2]
    assert len(completed) == 1
    requested = await deploy.events("rollout.requested")
    assert rid in {e["rollout_id"] for e in requested}


async def test_wave_whose_devices_fail_activation_is_rolled_back(deploy: DeployStack) -> None:
    sel = {"fleet": deploy.unique}
    devices = await deploy.devices(4, sel)
    v1 = await _baseline(deploy, devices, sel)
    await deploy.validated(_model(deploy), "2", failing_model())
    code, body = await deploy.start(
        _model(deploy), "2", sel, waves=[{"count": 2}, {"percent": 100}], bake_seconds=5
    )
    assert code == 201, body
    done = await deploy.wait_rollout(body["rollout_id"], "rolled_back", "completed")
    assert done["state"] == "rolled_back"
    assert "failed to activate" in done["reason"]
    assert "warm-up" in done["reason"]  # the device's own reason reaches the operator
    first, second = done["wave_status"]
    assert first["state"] == "failed"
    assert first["failed"] == 2
    assert second["state"] == "pending"  # the second wave never started
    await deploy.running(devices, v1)  # every device runs v1 again
    rolled = list(await deploy.events("rollout.rolled_back"))
    assert [e["automatic"] for e in rolled if e["rollout_id"] == body["rollout_id"]] == [True]


async def test_failing_canary_verdict_rolls_back(deploy: DeployStack) -> None:
    sel = {"fleet": deploy.unique}
    devices = await deploy.devices(3, sel)
    v1 = await _baseline(deploy, devices, sel)
    v2 = await deploy.validated(_model(deploy), "2", classifier("iris").onnx)
    code, body = await deploy.start(
        _model(deploy), "2", sel, waves=[{"count": 1}, {"percent": 100}], bake_seconds=120
    )
    assert code == 201, body
    rid = body["rollout_id"]

    await deploy.wait_wave(rid, 0, "baking")
    canary = (await deploy.rollout(rid))["device_plan"][0]["device_id"]
    await deploy.running([canary], v2)  # type: ignore[arg-type]
    await deploy.publish(
        CanaryVerdict(
            rollout_id=uuid.UUID(rid),
            model=_model(deploy),
            version="2",
            wave=0,
            verdict=Verdict.FAIL,
            reasons=["error rate 12% vs baseline 1%"],
        )
    )
    done = await deploy.wait_rollout(rid, "rolled_back", within=30)
    assert "canary verdict is fail" in done["reason"]
    assert "error rate 12%" in done["reason"]
    await deploy.running(devices, v1)


async def test_pause_resume_and_abort(deploy: DeployStack) -> None:
    sel = {"fleet": deploy.unique}
    devices = await deploy.devices(3, sel)
    await _baseline(deploy, devices, sel)
    v2 = await deploy.validated(_model(deploy), "2", classifier("iris").onnx)
    code, body = await deploy.start(
        _model(deploy), "2", sel, waves=[{"count": 1}, {"percent": 100}], bake_seconds=1
    )
    assert code == 201, body
    rid = body["rollout_id"]
    code, paused = await deploy.action(rid, "pause")
    assert code == 200, paused
    assert paused["state"] == "paused"
    await asyncio.sleep(4)  # long enough for a running rollout to finish both waves
    now = await deploy.rollout(rid)
    assert now["state"] == "paused"
    assert now["current_wave"] == 0
    code, again = await deploy.action(rid, "pause")
    assert code == 409
    assert "paused" in again["detail"]
    code, resumed = await deploy.action(rid, "resume")
    assert code == 200
    assert resumed["state"] == "running"
    await deploy.wait_rollout(rid, "completed")
    await deploy.running(devices, v2)
    paused_events = [e for e in await deploy.events("rollout.paused") if e["rollout_id"] == rid]
    resumed_events = [e for e in await deploy.events("rollout.resumed") if e["rollout_id"] == rid]
    assert len(paused_events) == 1
    assert len(resumed_events) == 1

    # abort: the devices keep what they were given, and the group is free again
    v3 = await deploy.validated(_model(deploy), "3", classifier("iris").onnx)
    code, body = await deploy.start(
        _model(deploy), "3", sel, waves=[{"count": 1}, {"percent": 100}], bake_seconds=120
    )
    rid = body["rollout_id"]

    await deploy.wait_wave(rid, 0, "baking")
    code, aborted = await deploy.action(rid, "abort", reason="wrong version")
    assert code == 200
    assert aborted["state"] == "aborted"
    assert aborted["reason"] == "wrong version"
    canary = (await deploy.rollout(rid))["device_plan"][0]["device_id"]
    await deploy.running([canary], v3)
    await deploy.running([d for d in devices if d != canary], v2)  # type: ignore[arg-type]
    code, _ = await deploy.start(_model(deploy), "2", sel, waves=[{"percent": 100}], bake_seconds=0)
    assert code == 201


async def test_deployer_killed_mid_wave_resumes_without_repeating_a_wave(
    deploy: DeployStack,
) -> None:
    sel = {"fleet": deploy.unique}
    devices = await deploy.devices(4, sel)
    v1 = await deploy.validated(_model(deploy), "1", classifier("iris").onnx)
    code, body = await deploy.start(
        _model(deploy),
        "1",
        sel,
        waves=[{"count": 1}, {"percent": 50}, {"percent": 100}],
        bake_seconds=2,
    )
    assert code == 201, body
    rid = body["rollout_id"]

    await deploy.in_wave(rid, 1)
    await deploy.restart_deployer(kill=True)
    done = await deploy.wait_rollout(rid, "completed", "rolled_back", within=90)
    assert done["state"] == "completed", done["reason"]
    await deploy.running(devices, v1)
    started = [e for e in await deploy.events("rollout.wave.started") if e["rollout_id"] == rid]
    succeeded = [e for e in await deploy.events("rollout.wave.succeeded") if e["rollout_id"] == rid]
    assert sorted(e["wave"] for e in started) == [0, 1, 2]  # each wave started once
    assert sorted(e["wave"] for e in succeeded) == [0, 1, 2]
    assert len({e["event_id"] for e in started}) == 3


async def test_two_replicas_under_one_name_still_start_each_wave_once(
    deploy: DeployStack,
) -> None:
    """A second deployer process with the same instance id (two replicas on one host
    that both name themselves by the host, as `make up` did) drives the same rollouts:
    each transition checks the wave is still in the state it was read in, so no wave
    starts or succeeds twice."""
    port = free_port()
    env = deploy.deployer.env | {
        "EDGELOOP_DEPLOYER_API_PORT": "0",
        "EDGELOOP_DEPLOYER_HTTP_PORT": str(port),
    }
    log = deploy.deployer.log_path.with_name("deployer-2.log")
    twin = ServiceProcess("deployer-2", "edgeloop.deployer", port, env, log)
    twin.start()
    try:
        sel = {"fleet": deploy.unique}
        devices = await deploy.devices(4, sel)
        v1 = await deploy.validated(_model(deploy), "1", classifier("iris").onnx)
        rids = []
        for _ in range(2):
            code, body = await deploy.start(
                _model(deploy),
                "1",
                sel,
                waves=[{"count": 1}, {"count": 2}, {"count": 3}, {"percent": 100}],
                bake_seconds=0,
            )
            assert code == 201, body
            done = await deploy.wait_rollout(body["rollout_id"], "completed", "rolled_back")
            assert done["state"] == "completed", done["reason"]
            rids.append(body["rollout_id"])
        await deploy.running(devices, v1)
    finally:
        twin.terminate()
        await asyncio.to_thread(twin.proc.wait, 20)  # type: ignore[union-attr]
    for subject in ("rollout.wave.started", "rollout.wave.succeeded"):
        for rid in rids:
            waves = [e["wave"] for e in await deploy.events(subject) if e["rollout_id"] == rid]
            assert sorted(waves) == [0, 1, 2, 3], (subject, rid, waves)


async def test_refusals_say_why(deploy: DeployStack) -> None:
    sel = {"fleet": deploy.unique}
    await deploy.devices(2, sel)
    model = _model(deploy)
    await deploy.register(model, "1", classifier("iris").onnx)
    code, body = await deploy.start(model, "1", sel)
    assert code == 409
    assert "not validated yet" in body["detail"]
    await deploy.failed_validation(model, "2", classifier("iris").onnx, "accuracy 0.41 < 0.9")
    code, body = await deploy.start(model, "2", sel)
    assert code == 409
    assert "failed validation: accuracy 0.41 < 0.9" in body["detail"]
    code, body = await deploy.start(model, "9", sel)
    assert code == 404
    assert "no version 9" in body["detail"]
    await deploy.validated(model, "3", classifier("iris").onnx)
    code, body = await deploy.start(model, "3", {"fleet": "nowhere"})
    assert code == 422
    assert "no enrolled device matches" in body["detail"]

    # a rollout overlapping a running one is refused with the running one's id
    code, first = await deploy.start(
        model, "3", sel, waves=[{"count": 1}, {"percent": 100}], bake_seconds=300
    )
    assert code == 201
    code, body = await deploy.start(model, "3", sel)
    assert code == 409
    assert first["rollout_id"] in body["detail"]

    # the same refusal for a request from the bus: recorded, and announced
    request = RolloutRequested(
        rollout_id=uuid.uuid4(),
        model=model,
        version="2",
        selector={"fleet": "other"},
        waves=[WavePlan(percent=100)],
    )
    await deploy.publish(request)
    refused = await deploy.wait_rollout(str(request.rollout_id), "refused", within=30)
    assert "failed validation" in refused["reason"]
    events = await deploy.events("rollout.refused")
    assert str(request.rollout_id) in {e["rollout_id"] for e in events}

    # a deprecated version: new rollouts refused, with the reason given
    resp = await deploy.registry.post(
        f"/api/v1/models/{model}/versions/3/deprecate", json={"reason": "CVE in a dependency"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["stage"] == "deprecated"
    code, body = await deploy.start(model, "3", sel)
    assert code == 409
    assert "deprecated: CVE in a dependency" in body["detail"]
    trail = (await deploy.registry.get("/api/v1/audit", params={"model": model})).json()
    assert [r["reason"] for r in trail["records"] if r["action"] == "model.deprecate"] == [
        "CVE in a dependency"
    ]


async def _one_wave(
    deploy: DeployStack, version: str, sel: dict[str, str], *, max_failures: int
) -> dict[str, Any]:
    """A one-wave rollout with a 3 s convergence timeout, to its end."""
    code, body = await deploy.start(
        _model(deploy),
        version,
        sel,
        waves=[{"percent": 100}],
        bake_seconds=0,
        converge_timeout_seconds=3,
        max_failures=max_failures,
    )
    assert code == 201, body
    return await deploy.wait_rollout(body["rollout_id"], "rolled_back", "completed")


async def test_a_device_online_at_its_wave_start_that_does_not_converge_counts_against_the_budget(
    deploy: DeployStack,
) -> None:
    """A device drawn into a wave (online and healthy when it started) that does not
    converge within the timeout — here a link too slow for the download — counts against
    the wave's budget; a device offline at the wave's start is a straggler and does not."""
    sel = {"fleet": deploy.unique}
    devices = await deploy.devices(3, sel)
    slow = (await deploy.devices(1, sel, prefix="s", faults=Faults(slow_link_bytes_per_s=20)))[0]
    v1 = await deploy.validated(_model(deploy), "1", classifier("iris").onnx)
    offline = devices[0]
    await deploy.stop_device(offline)
    online = devices[1:]
    done = await _one_wave(deploy, "1", sel, max_failures=1)
    assert done["state"] == "completed", done["reason"]
    assert done["wave_status"][0]["members"] == 3
    assert done["wave_status"][0]["failed"] == 1
    outcome = {d["device_id"]: d["outcome"] for d in done["device_plan"]}
    assert outcome[slow] == "timeout"
    assert outcome[offline] == "straggler"
    assert [s["device_id"] for s in done["stragglers"]] == [offline]
    await deploy.running(online, v1)

    # with no budget, the same slow device rolls the wave back
    await deploy.validated(_model(deploy), "2", classifier("iris").onnx)
    done = await _one_wave(deploy, "2", sel, max_failures=0)
    assert done["state"] == "rolled_back"
    assert "did not converge within 3 s" in done["reason"]
    assert slow in done["reason"]
    assert offline not in done["reason"]
    await deploy.running(online, v1)


async def test_release_policy_rolls_validated_versions_out_up_to_its_approval_gate(
    deploy: DeployStack,
) -> None:
    """A model's release policy rolls each validated version out by itself and holds it
    at the approval gate; the requester cannot approve their own rollout."""
    sel = {"fleet": deploy.unique}
    devices = await deploy.devices(3, sel)
    model = _model(deploy)
    cli_env = {
        "EDGELOOP_DEPLOYER_API": str(deploy.api.base_url),
        "EDGELOOP_API_TOKEN": TOKEN,
    }

    def cli(*args: str) -> Result:
        return CliRunner().invoke(app, list(args), env=cli_env)

    resp = await deploy.api.put(f"/v1/policies/{model}", json={"auto_rollout": True})
    assert resp.status_code == 422
    assert "selector" in resp.json()["detail"]
    result = await asyncio.to_thread(
        cli, "rollout", "policy", "set", model, "--auto", "--selector", f"fleet={deploy.unique}",
        "--waves", "1,100%", "--bake", "0.3s", "--approval", "after-first-wave",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "automatic rollout of validated versions: on" in result.output
    assert "approval: after first wave" in result.output

    v1 = await deploy.validated(model, "1", classifier("iris").onnx)

    async def policy_rollout() -> dict[str, Any] | None:
        rows = (await deploy.api.get("/v1/rollouts", params={"model": model})).json()
        return rows["rollouts"][0] if rows["rollouts"] else None

    first = await eventually(policy_rollout, within=30, what="the policy's rollout")
    assert first["requested_by"] == "policy"
    assert first["version"] == "1"
    held = await deploy.wait_rollout(first["rollout_id"], "awaiting_approval")
    assert [w["state"] for w in held["wave_status"]] == ["succeeded", "pending"]
    assert held["approval_wave"] == 1
    assert held["approved_by"] is None
    asked = list(await deploy.events("rollout.approval.requested"))
    assert [(e["rollout_id"], e["wave"]) for e in asked] == [(first["rollout_id"], 1)]
    status = await asyncio.to_thread(cli, "rollout", "status", first["rollout_id"])
    assert "waits for an approval before wave 1" in status.output
    # the canary device runs v1; the others wait at the gate
    await deploy.running([held["device_plan"][0]["device_id"]], v1)
    rest = [d["device_id"] for d in held["device_plan"][1:]]
    for d in rest:
        assert ((await deploy.edge.reported(d)) or {}).get("digest") != v1.digest

    approved = await asyncio.to_thread(
        cli, "rollout", "approve", first["rollout_id"], "--reason", "canary looks fine"
    )
    assert approved.exit_code == 0, approved.output
    done = await deploy.wait_rollout(first["rollout_id"], "completed", "rolled_back")
    assert done["state"] == "completed", done["reason"]
    assert done["approval_reason"] == "canary looks fine"
    await deploy.running(devices, v1)
    again = await deploy.action(first["rollout_id"], "approve")
    assert again[0] == 409

    # a gate before the first wave; an operator cannot approve their own request
    resp = await deploy.api.put(
        f"/v1/policies/{model}", json={"auto_rollout": False, "approval": "before_rollout"}
    )
    assert resp.status_code == 200, resp.text
    v2 = await deploy.validated(model, "2", classifier("iris").onnx)
    code, body = await deploy.start(model, "2", sel, waves=[{"percent": 100}], bake_seconds=0)
    assert code == 201, body
    held = await deploy.wait_rollout(body["rollout_id"], "awaiting_approval")
    assert held["wave_status"][0]["state"] == "pending"
    code, refused = await deploy.action(body["rollout_id"], "approve")
    assert code == 403, refused
    assert "someone else" in refused["detail"]
    resp = await deploy.api.post(
        f"/v1/rollouts/{body['rollout_id']}/approve",
        json={"reason": "second pair of eyes"},
        headers={"Authorization": f"Bearer {APPROVER_TOKEN}"},
    )
    assert resp.status_code == 200, resp.text
    done = await deploy.wait_rollout(body["rollout_id"], "completed", "rolled_back")
    assert done["state"] == "completed", done["reason"]
    assert done["approved_by"] not in (None, done["requested_by"])
    await deploy.running(devices, v2)
    # without the automatic rollout, v2's validation started nothing by itself
    rows = (await deploy.api.get("/v1/rollouts", params={"model": model})).json()["rollouts"]
    assert len(rows) == 2
    # the audit trail: who set the policy, started and approved each rollout
    trail = (await deploy.registry.get("/api/v1/audit", params={"model": model})).json()
    actions = [(r["action"], r["actor"]) for r in trail["records"] if r["service"] == "deployer"]
    assert [a for a, _ in actions] == [
        "release_policy.set",
        "rollout.start",
        "rollout.approve",
        "release_policy.set",
        "rollout.start",
        "rollout.approve",
    ]
    starts = [actor for action, actor in actions if action == "rollout.start"]
    approvals = [actor for action, actor in actions if action == "rollout.approve"]
    assert starts[0] == "policy"
    assert approvals[1] != starts[1]  # four eyes, on the record


async def test_a_rollout_to_gated_labels_waits_for_an_approval(deploy: DeployStack) -> None:
    """A policy gate by destination (env=prod): a rollout there waits before its first
    wave; the same version elsewhere goes straight on."""
    u = deploy.unique
    model = _model(deploy)
    prod = await deploy.devices(1, {"fleet": u, "env": "prod"}, prefix="p")
    lab = await deploy.devices(1, {"fleet": u, "env": "lab"}, prefix="l")
    resp = await deploy.api.put(f"/v1/policies/{model}", json={"approval_labels": {"env": "prod"}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["approval_labels"] == {"env": "prod"}
    v1 = await deploy.validated(model, "1", classifier("iris").onnx)
    code, to_lab = await deploy.start(
        model, "1", {"env": "lab"}, waves=[{"percent": 100}], bake_seconds=0
    )
    assert code == 201, to_lab
    code, to_prod = await deploy.start(
        model, "1", {"env": "prod"}, waves=[{"percent": 100}], bake_seconds=0
    )
    assert code == 201, to_prod
    held = await deploy.wait_rollout(to_prod["rollout_id"], "awaiting_approval")
    assert held["approval_wave"] == 0
    done = await deploy.wait_rollout(to_lab["rollout_id"], "completed", "rolled_back")
    assert done["state"] == "completed"
    assert done["approval_wave"] is None
    await deploy.running(lab, v1)
    resp = await deploy.api.post(
        f"/v1/rollouts/{to_prod['rollout_id']}/approve",
        json={"reason": "change ticket 42"},
        headers={"Authorization": f"Bearer {APPROVER_TOKEN}"},
    )
    assert resp.status_code == 200, resp.text
    await deploy.wait_rollout(to_prod["rollout_id"], "completed")
    await deploy.running(prod, v1)


async def test_a_selector_reaching_gated_devices_by_another_label_waits(
    deploy: DeployStack,
) -> None:
    """The gate looks at the devices a rollout reaches, not at the selector's words: a
    selector naming only a site still reaches env=prod devices there, and waits."""
    u = deploy.unique
    model = _model(deploy)
    await deploy.devices(1, {"fleet": u, "env": "prod", "site": f"s{u}"}, prefix="p")
    resp = await deploy.api.put(f"/v1/policies/{model}", json={"approval_labels": {"env": "prod"}})
    assert resp.status_code == 200, resp.text
    await deploy.validated(model, "1", classifier("iris").onnx)
    code, body = await deploy.start(
        model, "1", {"site": f"s{u}"}, waves=[{"percent": 100}], bake_seconds=0
    )
    assert code == 201, body
    held = await deploy.wait_rollout(body["rollout_id"], "awaiting_approval")
    assert held["approval_wave"] == 0
