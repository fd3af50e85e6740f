"""The monitor's canary verdicts drive the deployer: a version that passed validation
but predicts differently from the running one on the same inputs is rolled back by
itself after its first wave; a good one is promoted. Real registry, gateway, agents,
deployer process, monitor service, NATS and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from edgeloop.devstack.servers import NatsServer, free_port
from tests.deploy_harness import DeployStack, lifecycle_events, monitor_beside
from tests.modelzoo import classifier

pytestmark = pytest.mark.slow


@pytest.fixture
async def stack(
    deploy: DeployStack, nats_private: NatsServer, private_dsn: str, registry_url: str
) -> AsyncIterator[DeployStack]:
    """The deployment stack with a monitor service (2 s windows) beside it."""
    monitor = monitor_beside(deploy, nats_private.url, private_dsn, registry_url, free_port())
    async with monitor.running():
        yield deploy


async def test_a_canary_predicting_differently_is_rolled_back_by_its_verdict(
    stack: DeployStack,
) -> None:
    sel = {"fleet": stack.unique}
    model = f"iris{stack.unique}"
    good = classifier("iris")
    devices = await stack.devices(4, sel, telemetry_seconds=0.5, infer_seconds=0.05)
    v1 = await stack.validated(model, "1", good.onnx, good.reference)
    code, body = await stack.start(model, "1", sel, waves=[{"percent": 100}], bake_seconds=0)
    assert code == 201, body
    await stack.wait_rollout(body["rollout_id"], "completed")
    await stack.running(devices, v1)

    # passes validation, but has learned almost nothing: one class for every input
    bad = classifier("iris", c=1e-5)
    await stack.validated(model, "2", bad.onnx, good.reference)
    # a verdict rests on at least two devices on each side (min_devices)
    code, body = await stack.start(
        model, "2", sel, waves=[{"count": 2}, {"percent": 100}], bake_seconds=120
    )
    assert code == 201, body
    rid = body["rollout_id"]
    done = await stack.wait_rollout(rid, "rolled_back", "completed", within=90)
    assert done["state"] == "rolled_back"
    assert "canary verdict is fail" in done["reason"]
    assert "predictions differ from the baseline" in done["reason"]
    assert done["wave_status"][1]["state"] == "pending"  # never reached the others
    await stack.running(devices, v1)
    verdicts = await lifecycle_events(stack.edge.js, "rollout.canary.verdict")
    fails = [v for v in verdicts if v["rollout_id"] == rid and v["verdict"] == "fail"]
    assert fails
    assert fails[0]["metrics"]["prediction_psi"] > 0.25

    # a retrained version that behaves like v1 passes its canary and is promoted
    v3 = await stack.validated(model, "3", classifier("iris", seed=1).onnx, good.reference)
    code, body = await stack.start(
        model, "3", sel, waves=[{"count": 2}, {"percent": 100}], bake_seconds=6
    )
    assert code == 201, body
    done = await stack.wait_rollout(body["rollout_id"], "completed", "rolled_back", within=90)
    assert done["state"] == "completed", done["reason"]
    await stack.running(devices, v3)
    verdicts = await lifecycle_events(stack.edge.js, "rollout.canary.verdict")
    mine = [v["verdict"] for v in verdicts if v["rollout_id"] == body["rollout_id"]]
    assert "pass" in mine
    assert "fail" not in mine
