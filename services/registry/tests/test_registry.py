"""The registry service for real: HTTP API in-process against real NATS, PostgreSQL and
the OCI registry; events checked on the LIFECYCLE stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from nats.js import JetStreamContext

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ModelCommitted, ValidationPassed
from edgeloop.devstack.testing import eventually, publish_event, stream_messages
from edgeloop.kit.oci import OciClient
from tests.deploy_harness import registry_service
from tests.modelzoo import classifier, npz, regressor


class Api:
    def __init__(
        self, client: httpx.AsyncClient, svc: Any, schema: str, admin: JetStreamContext
    ) -> None:
        self.client = client
        self.admin = admin  # reads the streams (the registry's own user may not)
        self.svc = svc
        self.schema = schema

    async def register(self, name: str, files: dict[str, bytes], **form: str) -> httpx.Response:
        return await self.client.post(
            f"/api/v1/models/{name}/versions",
            files={k: (f"{k}.bin", v) for k, v in files.items()},
            data=form,
        )


@pytest.fixture
async def api(
    nats_url: str, pg_dsn: str, registry_url: str, unique: str, admin_js: JetStreamContext
) -> AsyncIterator[Api]:
    async with registry_service(
        nats_url, pg_dsn, registry_url, unique, max_model_bytes=2_000_000
    ) as (svc, client):
        yield Api(client, svc, svc.schema, admin_js)


def _m(name: str) -> dict[str, bytes]:
    m = classifier()
    return {"model": m.onnx, "suite": m.suite, "reference": m.reference}


async def _committed(api: Api, name: str) -> list[ModelCommitted]:
    msgs = await stream_messages(api.admin, s.STREAM_LIFECYCLE, s.MODEL_COMMITTED)
    events = [ModelCommitted.from_json(m.data) for m in msgs]
    return [e for e in events if e.model == name]


async def test_register_stores_bytes_and_emits_model_committed(
    api: Api, unique: str, registry_url: str
) -> None:
    name = f"bc-{unique}"
    resp = await api.register(
        name,
        _m(name),
        source_commit="abc123",
        data_digest="sha256:dd",
        params=json.dumps({"C": "1.0"}),
        tags=json.dumps({"team": "a"}),
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["version"] == "1"
    assert body["created"] is True
    assert body["model_digest"].startswith("sha256:")
    events = await eventually(lambda: _committed(api, name), what="model.committed")
    assert len(events) == 1
    ev = events[0]
    assert (ev.version, ev.source_commit, ev.params) == ("1", "abc123", {"C": "1.0"})
    assert ev.model_artifact.digest == body["model_digest"]
    # The bytes are in the OCI registry, content-addressed.
    async with OciClient(registry_url) as oci:
        assert await oci.get_blob(ev.repository, ev.model_artifact.digest) == classifier().onnx
        assert ev.reference_artifact is not None
        profile = json.loads(await oci.get_blob(ev.repository, ev.reference_artifact.digest))
    assert profile["rows"] > 100
    assert len(profile["features"]) == classifier().n_features
    assert profile["features"][0]["name"] == "mean radius"
    assert sum(profile["prediction"]["counts"]) == profile["rows"]

    # Auto-increment, show, list, alias.
    resp2 = await api.register(name, _m(name), params=json.dumps({"C": "2.0"}))
    assert resp2.json()["version"] == "2"
    shown = (await api.client.get(f"/api/v1/models/{name}")).json()
    assert [v["version"] for v in shown["versions"]] == ["1", "2"]
    assert (
        await api.client.put(f"/api/v1/models/{name}/aliases/champion", json={"version": "1"})
    ).status_code == 200
    champion = (await api.client.get(f"/api/v1/models/{name}/aliases/champion")).json()
    assert champion["version"] == "1"
    listed = (await api.client.get("/api/v1/models")).json()
    assert any(m["name"] == name and m["versions"] == 2 for m in listed)


async def test_versions_are_immutable_and_idempotent(api: Api, unique: str) -> None:
    name = f"imm-{unique}"
    first = await api.register(name, _m(name), version="1.0.0")
    assert first.status_code == 201
    again = await api.register(name, _m(name), version="1.0.0")
    assert again.status_code == 200  # same bytes: idempotent success
    assert again.json()["created"] is False
    other = regressor()
    conflict = await api.register(name, {"model": other.onnx}, version="1.0.0")
    assert conflict.status_code == 409
    assert "immutable" in conflict.json()["detail"]
    events = await eventually(lambda: _committed(api, name), what="model.committed")
    assert len(events) == 1  # the idempotent repeat emitted nothing


@pytest.mark.parametrize(
    ("files", "form", "status", "message"),
    [
        ({"model": b"not an onnx file"}, {}, 422, "not a model onnxruntime can load"),
        ({"model": b"x" * 2_000_001}, {}, 413, "limit"),
        ("suite_wrong_features", {}, 422, "takes 30"),
        ("suite_bad_npz", {}, 422, "not a NumPy .npz"),
        ("suite_missing_y", {}, 422, "lacks the array(s) y"),
        ("reference_nan", {}, 422, "NaN"),
        ("ok", {"parent": "nope@1"}, 422, "is not a registered version"),
        ("ok", {"params": "[1]"}, 422, "JSON object of strings"),
    ],
)
async def test_bad_uploads_get_actionable_4xx(
    api: Api, unique: str, files: Any, form: dict[str, str], status: int, message: str
) -> None:
    m = classifier()
    cases = {
        "suite_wrong_features": {"model": m.onnx, "suite": npz(X=np.zeros((5, 3)), y=np.zeros(5))},
        "suite_bad_npz": {"model": m.onnx, "suite": b"garbage"},
        "suite_missing_y": {"model": m.onnx, "suite": npz(X=np.zeros((5, 30)))},
        "reference_nan": {"model": m.onnx, "reference": npz(X=np.full((5, 30), np.nan))},
        "ok": {"model": m.onnx},
    }
    resp = await api.register(
        f"bad-{unique}", cases.get(files, files) if isinstance(files, str) else files, **form
    )
    assert resp.status_code == status, resp.text
    assert message in resp.json()["detail"]


async def test_bad_names_and_tokens(api: Api, unique: str) -> None:
    resp = await api.register("Bad Name!", {"model": classifier().onnx})
    assert resp.status_code in (404, 422)
    bad = await api.register("UPPER", {"model": classifier().onnx})
    assert bad.status_code == 422
    assert "invalid model name" in bad.json()["detail"]
    anon = await api.client.get("/api/v1/models", headers={"Authorization": ""})
    assert anon.status_code == 401
    wrong = await api.client.get("/api/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert "API token" in wrong.json()["detail"]


async def test_lineage_and_projection_of_validation(
    api: Api, unique: str, admin_js: JetStreamContext
) -> None:
    name = f"lin-{unique}"
    assert (await api.register(name, _m(name))).status_code == 201
    child = await api.register(name, _m(name), parent=f"{name}@1", version="2")
    assert child.status_code == 201
    # A validation.passed for v2 moves the candidate alias and shows in the version.
    await publish_event(
        admin_js,
        ValidationPassed(
            model=name,
            version="2",
            image="x/y",
            digest="sha256:" + "1" * 64,
            metrics={"accuracy": 0.97},
        ),
    )

    async def candidate() -> Any:
        body = (await api.client.get(f"/api/v1/models/{name}/versions/2")).json()
        return body if body["validation_state"] == "passed" else None

    body = await eventually(candidate, what="validation projection")
    assert body["parent_model"] == name
    assert body["parent_version"] == "1"
    assert body["validation_detail"]["metrics"] == {"accuracy": 0.97}
    assert body["aliases"] == ["candidate"]
