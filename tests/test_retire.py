"""Retiring model versions against real components: the registry, the gateway with real
agents, the deployer as its own process (SIGKILLed mid-way in one test), NATS JetStream,
PostgreSQL and the OCI registry."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from edgeloop.cli.main import app
from edgeloop.contracts.twin import image_repository
from edgeloop.devstack.servers import NatsServer
from edgeloop.devstack.testing import eventually
from edgeloop.kit.oci import ManifestNotFound, OciClient
from edgeloop.kit.oci.signing import signature_tag
from tests.deploy_harness import DeployStack, deploy_stack
from tests.edge_harness import TOKEN
from tests.modelzoo import classifier, failing_model

pytestmark = pytest.mark.slow

ONE_WAVE = {"waves": [{"percent": 100}], "bake_seconds": 0}


@pytest.fixture
async def archiving(
    nats_private: NatsServer, private_dsn: str, registry_url: str, tmp_path: Path, unique: str
) -> AsyncIterator[DeployStack]:
    """The deploy stack with a registry that archives retired versions at once."""
    async with deploy_stack(
        nats_private.url,
        private_dsn,
        registry_url,
        tmp_path,
        unique,
        retention_seconds=0,
        archive_sweep_seconds=0.2,
    ) as st:
        yield st


async def _on_v1(st: DeployStack, devices: list[str], selector: dict[str, str]) -> Any:
    """``devices`` (``selector``) running v1, through a one-wave rollout."""
    model = f"iris{st.unique}"
    v1 = await st.validated(model, "1", classifier("iris").onnx)
    code, body = await st.start(model, "1", selector, **ONE_WAVE)
    assert code == 201, body
    await st.wait_rollout(body["rollout_id"], "completed")
    await st.running(devices, v1)
    return v1


async def _retire(st: DeployStack, version: str, **body: Any) -> tuple[int, dict[str, Any]]:
    resp = await st.api.post(
        "/v1/retirements", json={"model": f"iris{st.unique}", "version": version, **body}
    )
    return resp.status_code, resp.json()


async def _ended(st: DeployStack, retirement_id: str) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        resp = await st.api.get(f"/v1/retirements/{retirement_id}")
        body: dict[str, Any] = resp.json()
        return body if body["state"] in ("retired", "failed") else None

    return dict(await eventually(ended, within=120, what=f"retirement {retirement_id} ended"))


async def _version(st: DeployStack, version: str) -> dict[str, Any]:
    resp = await st.registry.get(f"/api/v1/models/iris{st.unique}/versions/{version}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def _actions(st: DeployStack, version: str) -> list[str]:
    trail = await st.registry.get(
        "/api/v1/audit", params={"model": f"iris{st.unique}", "version": version}
    )
    return [r["action"] for r in trail.json()["records"]]


async def test_retire_refused_in_use_then_replaced_by_a_rollout_to_exactly_its_devices(
    deploy: DeployStack,
) -> None:
    u, model = deploy.unique, f"iris{deploy.unique}"
    on_v1 = await deploy.devices(3, {"fleet": u, "grp": "a"}, prefix="a")
    other = await deploy.devices(1, {"fleet": u, "grp": "b"}, prefix="b")
    await _on_v1(deploy, on_v1, {"fleet": u, "grp": "a"})
    v2 = await deploy.validated(model, "2", classifier("iris").onnx)

    code, body = await _retire(deploy, "1", reason="superseded")
    assert code == 409, body
    assert f"{model}@1 still runs on 3 device(s)" in body["detail"]
    assert all(d in body["detail"] for d in on_v1)
    assert "--replace-with" in body["detail"]

    rid = str(uuid.uuid4())
    code, started = await _retire(
        deploy, "1", reason="superseded", replace_with=f"{model}@2", retirement_id=rid, **ONE_WAVE
    )
    assert code == 201, started
    assert started["state"] == "replacing"
    assert sorted(started["devices"]) == sorted(on_v1)
    # a retried request (same id, or none while it is under way) starts nothing new
    code, again = await _retire(
        deploy, "1", reason="superseded", replace_with=f"{model}@2", retirement_id=rid, **ONE_WAVE
    )
    assert (code, again["rollout_id"]) == (200, started["rollout_id"])
    code, again = await _retire(deploy, "1", replace_with=f"{model}@2", **ONE_WAVE)
    assert (code, again["retirement_id"]) == (200, rid)

    await deploy.restart_deployer(kill=True)  # wherever it was, the retirement goes on
    done = await _ended(deploy, rid)
    assert done["state"] == "retired", done["detail"]
    await deploy.running(on_v1, v2)
    rollout = await deploy.rollout(started["rollout_id"])
    assert rollout["state"] == "completed"
    assert sorted(d["device_id"] for d in rollout["device_plan"]) == sorted(on_v1)
    untouched = await deploy.edge.reported(other[0])
    assert not (untouched or {}).get("model")
    listed = (await deploy.api.get("/v1/rollouts", params={"model": model})).json()
    assert [r["version"] for r in listed["rollouts"]].count("2") == 1

    v = await _version(deploy, "1")
    assert v["stage"] == "retired"
    assert v["stage_reason"] == "superseded"
    assert v["retired_at"]
    assert v["archive_at"]
    assert not v["archived_at"]
    actions = await _actions(deploy, "1")
    assert "retirement.start" in actions
    assert "model.deprecate" in actions  # while its devices moved
    assert actions.count("model.retire") == 1

    # a retired version cannot be rolled out, aliased or retired again
    code, body = await deploy.start(model, "1", {"fleet": u}, **ONE_WAVE)
    assert code == 409
    assert "is retired" in body["detail"]
    resp = await deploy.registry.put(
        f"/api/v1/models/{model}/aliases/champion", json={"version": "1"}
    )
    assert resp.status_code == 409
    assert "retired" in resp.json()["detail"]
    code, body = await _retire(deploy, "1", reason="again")
    assert code == 409
    assert "already retired" in body["detail"]


async def test_a_replacement_that_rolls_back_leaves_the_version_deprecated(
    deploy: DeployStack,
) -> None:
    u, model = deploy.unique, f"iris{deploy.unique}"
    devices = await deploy.devices(2, {"fleet": u})
    v1 = await _on_v1(deploy, devices, {"fleet": u})
    await deploy.validated(model, "2", failing_model())
    # through the CLI, which follows it (--wait) and exits 1 when it failed
    env = {
        "EDGELOOP_DEPLOYER_API": str(deploy.api.base_url),
        "EDGELOOP_REGISTRY_API": str(deploy.registry.base_url),
        "EDGELOOP_API_TOKEN": TOKEN,
    }

    def cli(*args: str) -> Result:
        return CliRunner().invoke(app, list(args), env=env)

    result = await asyncio.to_thread(
        cli,
        *("models", "retire", f"{model}@1", "--reason", "superseded"),
        *("--replace-with", f"{model}@2", "--waves", "100%", "--bake", "0s"),
        *("--converge-timeout", "20s", "--wait"),
    )
    assert result.exit_code == 1, result.output
    assert "retired when it completes" in result.output
    assert f"{model}@1 NOT retired (it stays deprecated)" in result.output
    rid = result.output.split()[1].rstrip(":")
    done = await _ended(deploy, rid)
    assert done["state"] == "failed"
    assert done["rollout_state"] == "rolled_back"
    assert f"the replacement rollout {done['rollout_id']} rolled_back" in done["detail"]
    await deploy.running(devices, v1)
    v = await _version(deploy, "1")
    assert v["stage"] == "deprecated"
    assert "not retired" in v["stage_reason"]
    assert v["retired_at"] is None
    assert "model.retire" not in await _actions(deploy, "1")
    shown = await asyncio.to_thread(cli, "models", "show", f"{model}@1")
    assert "stage          deprecated (not retired (" in shown.output


async def test_a_version_no_device_runs_is_retired_then_archived(archiving: DeployStack) -> None:
    st, model = archiving, f"iris{archiving.unique}"
    image = await st.validated(model, "1", classifier("iris").onnx)
    resp = await st.registry.put(f"/api/v1/models/{model}/aliases/champion", json={"version": "1"})
    assert resp.status_code == 200, resp.text
    viewer = await st.registry.post(
        "/api/v1/tokens", json={"name": f"vera-{st.unique}", "role": "viewer"}
    )
    refused = await st.api.post(
        "/v1/retirements",
        json={"model": model, "version": "1"},
        headers={"Authorization": f"Bearer {viewer.json()['token']}"},
    )
    assert refused.status_code == 403
    assert "operator or admin" in refused.json()["detail"]

    before = await _version(st, "1")
    code, body = await _retire(st, "1", reason="obsolete")
    assert code == 201, body
    assert body["state"] == "retired"
    assert body["rollout_id"] is None

    async def archived() -> dict[str, Any] | None:
        v = await _version(st, "1")
        return v if v["stage"] == "archived" else None

    v = await eventually(archived, within=30, what=f"{model}@1 archived")
    # the metadata stays: lineage, digests, validation
    assert v["model_digest"] == before["model_digest"]
    assert v["validation_state"] == "passed"
    assert v["archived_at"] == v["archive_at"]
    assert v["aliases"] == []  # retiring dropped the champion alias
    actions = await _actions(st, "1")
    assert actions.count("model.retire") == actions.count("model.archive") == 1
    # champion set; then champion and candidate dropped by the retirement
    assert actions.count("model.alias") == 3
    # the bytes are gone from the OCI registry (manifests deleted; GC reclaims the blobs)
    repo = image_repository(image.image)
    async with OciClient(st.edge.registry_url) as oci:
        for r, ref in (
            (before["repository"], before["artifact_manifest"]),
            (repo, image.digest),
            (repo, signature_tag(image.digest)),
            (repo, "1"),
        ):
            with pytest.raises(ManifestNotFound):
                await oci.resolve(r, ref)

    # an archived version is neither rolled out nor aliased
    await st.devices(1, {"fleet": st.unique})
    code, body = await st.start(model, "1", {"fleet": st.unique}, **ONE_WAVE)
    assert code == 409
    assert "is archived" in body["detail"]
    resp = await st.registry.put(f"/api/v1/models/{model}/aliases/champion", json={"version": "1"})
    assert resp.status_code == 409
