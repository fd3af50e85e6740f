"""Shadow (challenger) models on devices (issue 17 item 2): ten agents keep acting on
their model while a challenger runs beside it on the same inputs; the monitor compares
them, and the deployer passes or fails the shadow phase on the agreement. A challenger
that disagrees on most inputs fails its phase and never gets a real wave. Real registry,
gateway, agents, deployer process, monitor service, NATS and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from edgeloop.devstack.servers import NatsServer
from edgeloop.devstack.testing import eventually
from edgeloop.edge.runtime import OnnxModel
from edgeloop.edge.shadow import output_labels
from tests.deploy_harness import DeployStack, monitor_beside
from tests.modelzoo import classifier, relabelled

# ten agents, a rollout and two shadow phases: about a minute (several on a loaded machine)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

#: short phases; two equal-sized models: a budget the challenger stays within at half the
#: inputs (10 devices x ~4 batches of 16 inputs a second, 2 s telemetry windows)
SHADOW = {
    "sample": 0.5,
    "duration_seconds": 8,  # then judged once 200 inputs were compared (telemetry lags)
    "min_agreement": 0.8,
    "min_compared": 200,
    "max_overhead": 3.0,
}


@pytest.fixture
async def stack(
    deploy: DeployStack, nats_private: NatsServer, private_dsn: str, registry_url: str
) -> AsyncIterator[DeployStack]:
    """The deployment stack with a monitor service beside it, where the deployer asks."""
    monitor = monitor_beside(
        deploy, nats_private.url, private_dsn, registry_url, deploy.monitor_port
    )
    async with monitor.running():
        yield deploy


async def test_a_challenger_runs_beside_the_champion_and_only_an_agreeing_one_passes(
    stack: DeployStack,
) -> None:
    sel = {"fleet": stack.unique}
    model = f"iris{stack.unique}"
    good = classifier("iris")
    # few, larger telemetry batches: the gateway and the monitor share this process
    devices = await stack.devices(10, sel, telemetry_seconds=2, infer_seconds=0.25)
    v1 = await stack.validated(model, "1", good.onnx, good.reference)
    code, body = await stack.start(model, "1", sel, waves=[{"percent": 100}], bake_seconds=0)
    assert code == 201, body
    await stack.wait_rollout(body["rollout_id"], "completed")
    await stack.running(devices, v1)

    # what each device acts on: every inference batch's rows and the labels acted on
    acted: dict[str, list[tuple[Any, list[str], str]]] = {d: [] for d in devices}
    for device in devices:
        agent = stack.agents[device]

        def record(rows: Any, labels: list[str], device: str = device) -> None:
            running = stack.agents[device].running
            assert running is not None
            acted[device].append((np.array(rows), list(labels), running.installed.version))

        agent.on_outputs = record

    # a retrained version that behaves like v1: runs as a challenger, passes
    v2 = await stack.validated(model, "2", classifier("iris", seed=1).onnx, good.reference)
    code, body = await stack.start(model, "2", sel, shadow=SHADOW)
    assert code == 201, body

    async def challengers() -> bool:  # every device runs it beside v1
        return all(stack.agents[d].challenger is not None for d in devices)

    await eventually(challengers, within=30, what="the challenger on every device")
    await stack.restart_deployer()  # SIGKILL mid-phase: it resumes the phase where it was
    assert {stack.agents[d].running.installed.version for d in devices} == {"1"}  # type: ignore[union-attr]
    passed = await stack.wait_rollout(
        body["rollout_id"], "shadow_passed", "shadow_failed", within=180
    )
    assert passed["state"] == "shadow_passed", passed["reason"]
    result = passed["shadow_result"]
    assert result["verdict"] == "passed"
    assert result["agreement"] >= 0.8
    report = result["report"]
    assert report["overall"]["compared"] >= 200
    assert report["overall"]["devices"] >= 2
    assert report["overall"]["latency"]["ratio_p50"] is not None
    assert report["groups"], report
    assert sorted(passed["shadow_devices"]) == sorted(devices)

    # only the champion's outputs were acted on, exactly as v1 predicts them
    v1_model = OnnxModel(good.onnx)
    during = 0
    for device in devices:
        names = stack.agents[device].running.labels  # type: ignore[union-attr]
        for rows, labels, version in acted[device]:
            assert version == "1"
            assert labels == output_labels(v1_model.predict(rows), names, len(rows))
            during += 1
    assert during >= 10
    await stack.running(devices, v1)  # nobody switched to the challenger
    for device in devices:  # and the challenger was taken off again
        doc = await stack.edge.desired(device)
        assert doc is not None
        assert doc.shadow is None
        assert doc.version == "1"

    # the challenger's outputs are marked as such: none counted in the model's windows
    windows = await stack.monitor("/v1/windows", model=model, version="2")
    assert windows["windows"] == []

    # the report over the API (as `edgeloop shadow report` shows it): challenger telemetry
    # from every device (its last batches may land after the verdict)
    async def from_all() -> Any:
        shown = await stack.monitor("/v1/shadow", model=model, version="2")
        return shown if shown["overall"]["devices"] == 10 else None

    shown = await eventually(from_all, within=90, what="challenger telemetry of 10 devices")
    assert shown["overall"]["agreement"] == pytest.approx(result["agreement"], abs=0.05)
    assert set(shown["overall"]["flip_matrix"]) <= {
        "setosa",
        "versicolor",
        "virginica",
        "0",
        "1",
        "2",
    }

    # a challenger that disagrees on nearly every input, under a release policy that
    # requires a shadow phase first: it fails the phase and never gets a real wave
    policy = {"shadow_first": SHADOW, "waves": [{"count": 2}, {"percent": 100}]}
    resp = await stack.api.put(f"/v1/policies/{model}", json=policy)
    assert resp.status_code == 200, resp.text
    assert resp.json()["shadow_first"]["then_waves"] is True
    await stack.validated(model, "3", relabelled("iris"), good.reference)
    code, body = await stack.start(
        model, "3", sel, waves=[{"count": 2}, {"percent": 100}], bake_seconds=0
    )
    assert code == 201, body
    failed = await stack.wait_rollout(body["rollout_id"], "shadow_failed", "completed", within=180)
    assert failed["state"] == "shadow_failed"
    assert failed["shadow_result"]["agreement"] < 0.2  # it disagrees on most inputs
    assert "agrees with the champion on" in failed["reason"]
    assert [w["state"] for w in failed["wave_status"]] == ["pending", "pending"]
    assert all(w["started_at"] is None for w in failed["wave_status"])
    events = await stack.events("rollout.shadow.failed")
    assert [e["rollout_id"] for e in events] == [body["rollout_id"]]
    started = await stack.events("rollout.shadow.started")
    assert len(started) == 2  # once per phase, the killed deployer's included
    assert not [e for e in await stack.events("rollout.wave.started") if e["version"] == "3"]
    await stack.running(devices, v1)
    assert v2.version == "2"
