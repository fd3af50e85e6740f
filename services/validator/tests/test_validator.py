"""register → build → validate, for real: the registry, builder and validator services in
one event loop against real NATS (JetStream), PostgreSQL and the OCI registry."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeloop.builder.app import build as build_builder
from edgeloop.builder.config import BuilderSettings
from edgeloop.contracts import subjects as s
from edgeloop.contracts.calibration import REPORT_KEY, CalibrationMap
from edgeloop.contracts.events import ImageBuilt, ValidationFailed
from edgeloop.devstack.nats_auth import NatsAuth
from edgeloop.devstack.servers import NatsServer, free_port
from edgeloop.devstack.testing import api_up, eventually, stream_messages
from edgeloop.kit.oci import OciClient
from edgeloop.kit.oci.image import build_model_image, push_image
from edgeloop.kit.oci.signing import generate_keypair
from edgeloop.kit.outbox import MSG_ID_HEADER
from edgeloop.registry.app import build as build_registry
from edgeloop.registry.config import RegistrySettings
from edgeloop.validator.app import build as build_validator
from edgeloop.validator.config import ValidatorSettings
from tests.modelzoo import classifier, npz

TOKEN = "validator-test-token-42-a9e3c1"
PRIVATE, PUBLIC = generate_keypair()


@pytest.fixture(scope="module")
def nats_private(
    tmp_path_factory: pytest.TempPathFactory, nats_auth: NatsAuth
) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats-validator"), auth=nats_auth).start()
    nats_auth.bootstrap(server.url)
    yield server
    server.stop()


class Loop:
    def __init__(self, api: httpx.AsyncClient, prefix: str, registry_url: str) -> None:
        self.api = api
        self.prefix = prefix
        self.registry_url = registry_url

    async def register(self, name: str, model: bytes, suite: bytes | None, **form: str) -> str:
        files = {"model": ("m.onnx", model)}
        if suite is not None:
            files["suite"] = ("s.npz", suite)
        resp = await self.api.post(f"/api/v1/models/{name}/versions", files=files, data=form)
        assert resp.status_code in (200, 201), resp.text
        return str(resp.json()["version"])

    async def settled(self, name: str, version: str) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            body = (await self.api.get(f"/api/v1/models/{name}/versions/{version}")).json()
            if body["validation_state"] != "pending" or body["build_state"] == "failed":
                return dict(body)
            return None

        return dict(await eventually(done, within=60, what=f"{name}@{version} validated"))


@pytest.fixture
async def loop(
    nats_private: NatsServer, pg_dsn: str, registry_url: str, unique: str
) -> AsyncIterator[Loop]:
    port = free_port()
    common = {
        "nats_url": nats_private.url,
        "database_url": pg_dsn,
        "oci_registry_url": registry_url,
    }
    services = [
        build_registry(
            RegistrySettings(
                **common, api_tokens=TOKEN, api_port=port, repository_prefix=f"v{unique}/models"
            )
        ),
        build_builder(
            BuilderSettings(
                **common, signing_key=PRIVATE.decode(), image_prefix=f"v{unique}/images"
            )
        ),
        build_validator(
            ValidatorSettings(
                **common,
                public_key=PUBLIC.decode(),
                registry_api=f"http://127.0.0.1:{port}",
                registry_token=TOKEN,
                profile_runs=30,
            )
        ),
    ]
    async with contextlib.AsyncExitStack() as stack:
        for svc in services:
            await stack.enter_async_context(svc.running())
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=30,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as api:
            await eventually(lambda: api_up(api), what="registry API")
            yield Loop(api, unique, registry_url)


async def test_good_model_is_validated_tagged_and_becomes_candidate(
    loop: Loop, unique: str
) -> None:
    m = classifier()
    name = f"good-{unique}"
    version = await loop.register(
        name, m.onnx, m.suite, params=json.dumps({"threshold.accuracy": "0.9"})
    )
    body = await loop.settled(name, version)
    assert body["build_state"] == "built"
    assert body["validation_state"] == "passed", body["validation_detail"]
    report = body["validation_detail"]["report"]
    assert report["metrics"]["accuracy"] > 0.9
    assert 0.9 < report["metrics"]["roc_auc"] <= 1.0
    assert set(report["profile"]["threads"]) == {"1", "2", "4"}
    assert report["profile"]["recommended_threads"] in (1, 2, 4)
    assert report["profile"]["threads"]["1"]["p99_ms"] > 0
    # the calibration map the monitor estimates accuracy with, learnt from the suite
    cal = CalibrationMap.model_validate(report[REPORT_KEY])
    assert cal.classes == ["0", "1"]
    assert cal.positive == "1"
    assert sum(cal.pooled.count) == cal.suite_rows > 0
    right = sum(cal.pooled.correct) / cal.suite_rows
    assert right == pytest.approx(report["metrics"]["accuracy"])
    assert cal.pooled.accuracy == sorted(cal.pooled.accuracy)  # monotone
    assert body["aliases"] == ["candidate"]
    image = body["build_detail"]["image"]
    async with OciClient(loop.registry_url) as oci:
        tags = await oci.list_tags(image.split("/", 1)[1])
    assert f"{version}-validated" in tags


def _graph(name: str, nodes: list[Any], out_shape: list[Any], inits: list[Any] = ()) -> bytes:  # type: ignore[assignment]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
        initializer=list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


SUITE4 = npz(
    X=np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32),
    y=np.zeros(10, dtype=np.float32),
)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (
            _graph(
                "nan",
                [helper.make_node("Mul", ["X", "nan"], ["Y"])],
                [None, 4],
                [helper.make_tensor("nan", TensorProto.FLOAT, [1], [float("nan")])],
            ),
            "NaN",
        ),
        (
            _graph(
                "shape",
                [helper.make_node("ReduceMean", ["X"], ["Y"], axes=[0], keepdims=1)],
                [1, 4],
            ),
            "wrong output shape",
        ),
        (
            _graph(
                "crash",
                [helper.make_node("Reshape", ["X", "shp"], ["Y"])],
                [3, None],
                [helper.make_tensor("shp", TensorProto.INT64, [2], [3, -1])],
            ),
            "inference crashed",
        ),
    ],
    ids=["nan-outputs", "wrong-shape", "crash"],
)
async def test_bad_models_fail_with_the_reason(
    loop: Loop, unique: str, model: bytes, reason: str
) -> None:
    name = f"bad-{unique}"
    version = await loop.register(name, model, SUITE4)
    body = await loop.settled(name, version)
    assert body["validation_state"] == "failed"
    assert any(reason in r for r in body["validation_detail"]["reasons"]), body


async def test_threshold_and_champion_regression(loop: Loop, unique: str) -> None:
    name = f"champ-{unique}"
    good = classifier()
    v1 = await loop.register(name, good.onnx, good.suite)
    assert (await loop.settled(name, v1))["validation_state"] == "passed"
    await loop.api.put(f"/api/v1/models/{name}/aliases/champion", json={"version": v1})
    worse = classifier(c=1e-5)  # heavily regularised: clearly worse on the same suite
    v2 = await loop.register(name, worse.onnx, good.suite)
    body = await loop.settled(name, v2)
    assert body["validation_state"] == "failed"
    reasons = body["validation_detail"]["reasons"]
    assert any("regresses against the champion" in r for r in reasons), reasons
    strict = await loop.register(
        name, good.onnx, good.suite, params=json.dumps({"threshold.accuracy": "0.9999"})
    )
    body = await loop.settled(name, strict)
    assert any("below the threshold 0.9999" in r for r in body["validation_detail"]["reasons"])


async def test_unsigned_image_is_refused(loop: Loop, unique: str, nats_private: NatsServer) -> None:
    import nats

    name = f"unsigned-{unique}"
    m = classifier()
    version = await loop.register(name, m.onnx, m.suite)
    await loop.settled(name, version)
    async with OciClient(loop.registry_url) as oci:
        repo = f"v{unique}/rogue/{name}"
        image = build_model_image(
            {"model/model.onnx": m.onnx, "model/model.json": b"{}"}, annotations={}
        )
        digest = await push_image(oci, repo, image, tag="x")
    nc = await nats.connect(nats_private.url)
    forged = ImageBuilt(
        model=name, version="99", image=f"{oci.host}/{repo}", digest=digest, size=image.size
    )
    await nc.jetstream().publish(
        s.IMAGE_BUILT, forged.to_json(), headers={MSG_ID_HEADER: str(forged.event_id)}
    )
    await nc.close()

    nc = await nats.connect(nats_private.url)
    try:

        async def failed() -> Any:
            msgs = await stream_messages(nc.jetstream(), s.STREAM_LIFECYCLE, s.VALIDATION_FAILED)
            evs = [ValidationFailed.from_json(x.data) for x in msgs]
            return [e for e in evs if e.model == name and e.version == "99"]

        evs = await eventually(failed, what="validation.failed of the forged image")
    finally:
        await nc.close()
    assert "not signed" in evs[0].reasons[0]


async def test_unreachable_registry_api_ends_in_failed_after_retries(
    nats_private: NatsServer, pg_dsn: str, registry_url: str, unique: str
) -> None:
    import nats

    from edgeloop.builder.service import Builder
    from edgeloop.contracts.events import ArtifactRef, ModelCommitted
    from edgeloop.kit.oci.signing import load_private_key

    m = classifier()
    async with OciClient(registry_url) as oci:
        suite = await oci.push_blob(f"u{unique}/models/m", m.suite)
        model = await oci.push_blob(f"u{unique}/models/m", m.onnx)
        committed = ModelCommitted(
            model=f"noapi{unique}",
            version="1",
            repository=f"u{unique}/models/m",
            model_artifact=ArtifactRef(digest=model.digest, size=model.size, media_type="x"),
            suite_artifact=ArtifactRef(digest=suite.digest, size=suite.size, media_type="x"),
        )
        built = (
            await Builder(oci, load_private_key(PRIVATE), image_prefix=f"u{unique}/images").build(
                committed, release=1
            )
        ).event
    svc = build_validator(
        ValidatorSettings(
            nats_url=nats_private.url,
            database_url=pg_dsn,
            oci_registry_url=registry_url,
            public_key=PUBLIC.decode(),
            registry_api=f"http://127.0.0.1:{free_port()}",
            registry_token=TOKEN,
            profile_runs=10,
            max_attempts=3,
            retry_backoff="0.2,0.2",
        )
    )
    async with svc.running():
        nc = await nats.connect(nats_private.url)
        await nc.jetstream().publish(s.IMAGE_BUILT, built.to_json())

        async def failed() -> Any:
            msgs = await stream_messages(nc.jetstream(), s.STREAM_LIFECYCLE, s.VALIDATION_FAILED)
            evs = [ValidationFailed.from_json(x.data) for x in msgs]
            return [e for e in evs if e.model == built.model]

        try:
            evs = await eventually(failed, within=60, what="validation.failed")
        finally:
            await nc.close()
    assert "could not validate after 3 attempts" in evs[0].reasons[0]
    assert "ConnectError" in evs[0].reasons[0]
