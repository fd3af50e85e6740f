"""Roles and tokens against the real registry, gateway and deployer: tokens issued with
a role (hashed, expiring, revocable), each API route limited to the roles that may use
it (403 naming the role it needs), and the audit trail naming the token's holder."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from edgeloop.devstack.testing import eventually
from tests.deploy_harness import DeployStack
from tests.edge_harness import TOKEN
from tests.modelzoo import classifier

pytestmark = pytest.mark.slow


async def _issue(st: DeployStack, name: str, role: str, expires: str | None = None) -> str:
    resp = await st.registry.post(
        "/api/v1/tokens", json={"name": name, "role": role, "expires_in": expires}
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["role"] == role
    return str(body["token"])


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_each_role_may_do_what_it_needs_and_nothing_more(deploy: DeployStack) -> None:
    u = deploy.unique
    model = f"roles{u}"
    viewer = await _issue(deploy, f"vera-{u}", "viewer")
    scientist = await _issue(deploy, f"dana-{u}", "data-scientist")
    operator = await _issue(deploy, f"otto-{u}", "operator")
    expiring = await _issue(deploy, f"brief-{u}", "operator", expires="1s")
    revoked = await _issue(deploy, f"gone-{u}", "operator")
    resp = await deploy.registry.post(f"/api/v1/tokens/gone-{u}/revoke")
    assert resp.status_code == 200, resp.text
    bad = await deploy.registry.post("/api/v1/tokens", json={"name": f"x-{u}", "role": "superuser"})
    assert bad.status_code == 422
    assert "unknown role" in bad.json()["detail"]

    onnx = classifier("iris").onnx
    files = {"model": ("model.onnx", onnx)}
    versions = f"/api/v1/models/{model}/versions"
    reg, gw, dep = deploy.registry, deploy.edge.api, deploy.api

    # a viewer reads everything and changes nothing
    assert (await reg.get("/api/v1/models", headers=_as(viewer))).status_code == 200
    assert (await dep.get("/v1/rollouts", headers=_as(viewer))).status_code == 200
    refused = await reg.post(versions, files=files, headers=_as(viewer))
    assert refused.status_code == 403
    assert "data-scientist or admin" in refused.json()["detail"]
    refused = await dep.post(
        "/v1/rollouts",
        json={"model": model, "version": "1", "selector": {"fleet": u}},
        headers=_as(viewer),
    )
    assert refused.status_code == 403
    assert "operator or admin" in refused.json()["detail"]
    refused = await gw.post(f"/v1/devices/v-{u}/enroll", json={}, headers=_as(viewer))
    assert refused.status_code == 403
    assert (await reg.get("/api/v1/tokens", headers=_as(viewer))).status_code == 403

    # a data scientist registers versions, but does not roll them out
    made = await reg.post(versions, files=files, data={"version": "1"}, headers=_as(scientist))
    assert made.status_code in (200, 201), made.text
    refused = await dep.post(
        "/v1/rollouts",
        json={"model": model, "version": "1", "selector": {"fleet": u}},
        headers=_as(scientist),
    )
    assert refused.status_code == 403

    # an operator enrols devices and rolls validated versions out, but registers nothing
    devices = await deploy.devices(1, {"fleet": u})
    await deploy.validated(model, "2", onnx)
    refused = await reg.post(versions, files=files, headers=_as(operator))
    assert refused.status_code == 403
    enrolled = await gw.post(f"/v1/devices/op-{u}/enroll", json={}, headers=_as(operator))
    assert enrolled.status_code == 201, enrolled.text
    started = await dep.post(
        "/v1/rollouts",
        json={"model": model, "version": "2", "selector": {"fleet": u},
              "waves": [{"percent": 100}], "bake_seconds": 0},
        headers=_as(operator),
    )  # fmt: skip
    assert started.status_code == 201, started.text
    done = await deploy.wait_rollout(started.json()["rollout_id"], "completed", "rolled_back")
    assert done["state"] == "completed"
    assert done["requested_by"] == f"otto-{u}"
    assert len(devices) == 1

    # revoked and expired tokens are refused, with the reason
    await asyncio.sleep(1.2)
    for token, why in ((revoked, "revoked"), (expiring, "expired")):
        resp = await dep.get("/v1/rollouts", headers=_as(token))
        assert resp.status_code == 401
        assert why in resp.json()["detail"]

    # tokens are listed without secrets; issuing and the rollout are on the record
    listed: list[dict[str, Any]] = (await reg.get("/api/v1/tokens")).json()["tokens"]
    mine = {t["name"]: t for t in listed if t["name"].endswith(u)}
    assert set(mine) == {f"{n}-{u}" for n in ("vera", "dana", "otto", "brief", "gone")}
    assert all("token" not in t and "hash" not in t for t in mine.values())
    assert mine[f"gone-{u}"]["revoked_at"] is not None
    trail = (await reg.get("/api/v1/audit", params={"limit": 1000})).json()["records"]
    issued = {r["subject"] for r in trail if r["action"] == "token.issue"}
    assert {f"token {n}-{u}" for n in ("vera", "dana", "otto")} <= issued
    starts = [r for r in trail if r["action"] == "rollout.start" and r["model"] == model]
    assert [r["actor"] for r in starts] == [f"otto-{u}"]


async def test_a_token_that_does_not_exist_is_refused(deploy: DeployStack) -> None:
    async with httpx.AsyncClient(base_url=str(deploy.api.base_url)) as client:
        resp = await client.get("/v1/rollouts", headers=_as("elt_not-a-token"))
        assert resp.status_code == 401
        resp = await client.get("/v1/rollouts")
        assert resp.status_code == 401


async def test_each_service_calls_with_a_token_of_its_own_and_only_its_role(
    deploy: DeployStack,
) -> None:
    """No service holds the admin token: each calls the APIs with its own
    (``service:<name>``, the least role its calls need). The loop still runs on them —
    the deployer reads the registry and the gateway to roll a validated version out, and
    deprecates and retires a version at the registry, audited under its own name — while
    none of them may issue a token, approve a rollout or do what its role does not give."""
    u, model = deploy.unique, f"svc{deploy.unique}"
    tokens = deploy.service_tokens
    reg, gw, dep = deploy.registry, deploy.edge.api, deploy.api

    listed = {t["name"]: t for t in (await reg.get("/api/v1/tokens")).json()["tokens"]}
    roles = {n: t["role"] for n, t in listed.items() if n.startswith("service:")}
    assert roles == {
        "service:validator": "viewer",
        "service:deployer": "service",
        "service:monitor": "viewer",
        "service:fleet": "operator",
    }
    assert {listed[n]["created_by"] for n in roles} == {"bootstrap"}
    assert TOKEN not in tokens.values()

    # the loop on the services' own tokens: register → validated → rollout → running
    onnx = classifier("iris").onnx
    devices = await deploy.devices(2, {"fleet": u})
    v1 = await deploy.validated(model, "1", onnx)
    code, started = await deploy.start(
        model, "1", {"fleet": u}, waves=[{"percent": 100}], bake_seconds=0
    )
    assert code == 201, started
    done = await deploy.wait_rollout(started["rollout_id"], "completed", "rolled_back")
    assert done["state"] == "completed", done
    await deploy.running(devices, v1)
    rollout_id = started["rollout_id"]

    # the deployer retires v1 through a replacement rollout: it deprecates and retires
    # the version with its own token, and the audit names it
    v2 = await deploy.validated(model, "2", onnx)
    resp = await dep.post(
        "/v1/retirements",
        json={"model": model, "version": "1", "replace_with": f"{model}@2",
              "waves": [{"percent": 100}], "bake_seconds": 0},
    )  # fmt: skip
    assert resp.status_code == 201, resp.text
    retirement = resp.json()["retirement_id"]

    async def retired() -> dict[str, Any] | None:
        body: dict[str, Any] = (await dep.get(f"/v1/retirements/{retirement}")).json()
        return body if body["state"] in ("retired", "failed") else None

    assert (await eventually(retired, within=120, what="retirement"))["state"] == "retired"
    await deploy.running(devices, v2)
    trail = await reg.get("/api/v1/audit", params={"model": model, "version": "1"})
    actors = {r["action"]: r["actor"] for r in trail.json()["records"]}
    assert actors["model.deprecate"] == "service:deployer"
    assert actors["model.retire"] == "service:deployer"

    # what each service's token may not do: 403 naming the role it would need
    versions = f"/api/v1/models/{model}/versions"
    for service in ("validator", "deployer", "monitor", "fleet"):
        token = _as(tokens[service])
        assert (await reg.get(f"{versions}/2", headers=token)).status_code == 200, service
        issued = await reg.post(
            "/api/v1/tokens", json={"name": f"x-{service}-{u}", "role": "admin"}, headers=token
        )
        assert issued.status_code == 403, service
        assert "this needs the role admin (tokens.admin)" in issued.json()["detail"]
        assert f"service:{service} has the role" in issued.json()["detail"]
        registered = await reg.post(
            versions, files={"model": ("model.onnx", onnx)}, data={"version": "9"}, headers=token
        )
        assert registered.status_code == 403, service
    for service in ("validator", "deployer", "monitor"):
        token = _as(tokens[service])
        approved = await dep.post(f"/v1/rollouts/{rollout_id}/approve", headers=token)
        assert approved.status_code == 403, service
        assert "operator or admin" in approved.json()["detail"]
        refused = await dep.post(
            "/v1/rollouts", json={"model": model, "version": "2", "selector": {"fleet": u}},
            headers=token,
        )  # fmt: skip
        assert refused.status_code == 403, service
        enrolled = await gw.post(f"/v1/devices/x-{service}-{u}/enroll", json={}, headers=token)
        assert enrolled.status_code == 403, service
    for service in ("validator", "monitor", "fleet"):
        token = _as(tokens[service])
        for verb, body in (("deprecate", {}), ("retire", {"reason": "no"})):
            resp = await reg.post(f"{versions}/2/{verb}", json=body, headers=token)
            assert resp.status_code == 403, (service, verb)
    assert (await _version_stage(deploy, model, "2")) == "active"

    # an admin revokes a service's token like any other
    resp = await reg.post("/api/v1/tokens/service:validator/revoke")
    assert resp.status_code == 200, resp.text
    resp = await reg.get(f"{versions}/2", headers=_as(tokens["validator"]))
    assert resp.status_code == 401
    assert "'service:validator' was revoked" in resp.json()["detail"]


async def _version_stage(st: DeployStack, model: str, version: str) -> str:
    resp = await st.registry.get(f"/api/v1/models/{model}/versions/{version}")
    assert resp.status_code == 200, resp.text
    return str(resp.json().get("stage", "active"))
