"""The builder for real: events on a real JetStream, images in a real registry."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from edgeloop.builder.app import build
from edgeloop.builder.config import BuilderSettings
from edgeloop.builder.service import Builder
from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ArtifactRef, ImageBuildFailed, ImageBuilt, ModelCommitted
from edgeloop.contracts.signing import SignedRelease
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import eventually, stream_messages
from edgeloop.kit.oci import OciClient
from edgeloop.kit.oci.image import read_layer_file
from edgeloop.kit.oci.signing import (
    generate_keypair,
    load_private_key,
    load_public_key,
    verify_image,
)
from edgeloop.kit.outbox import MSG_ID_HEADER
from tests.modelzoo import classifier

PRIVATE, PUBLIC = generate_keypair()


async def _commit(oci: OciClient, unique: str, data: bytes, **kw: object) -> ModelCommitted:
    repo = f"t{unique}/models/m"
    desc = await oci.push_blob(repo, data)
    return ModelCommitted(
        model=f"m{unique}",
        version="1",
        repository=repo,
        model_artifact=ArtifactRef(digest=desc.digest, size=desc.size, media_type="x"),
        source_commit="c0ffee",
        data_digest="sha256:data",
        params={"threshold.accuracy": "0.9"},
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def oci(registry_url: str) -> AsyncIterator[OciClient]:
    async with OciClient(registry_url) as client:
        yield client


def _settings(nats_url: str, pg_dsn: str, registry_url: str, unique: str) -> BuilderSettings:
    return BuilderSettings(
        nats_url=nats_url,
        database_url=pg_dsn,
        oci_registry_url=registry_url,
        signing_key=PRIVATE.decode(),
        image_prefix=f"t{unique}/images",
        max_attempts=3,
        retry_backoff="0.2,0.2,0.2",
    )


async def _two_built(js: JetStreamContext, model: str) -> list[ImageBuilt] | None:
    got = await _events(js, s.IMAGE_BUILT, model, ImageBuilt)
    return sorted(got, key=lambda e: e.version) if len(got) == 2 else None


async def _events(js: object, subject: str, model: str, cls: type) -> list:  # type: ignore[type-arg]
    msgs = await stream_messages(js, s.STREAM_LIFECYCLE, subject)  # type: ignore[arg-type]
    return [e for e in (cls.from_json(m.data) for m in msgs) if e.model == model]


async def test_committed_version_becomes_a_signed_image(
    nats_url: str,
    pg_dsn: str,
    registry_url: str,
    unique: str,
    oci: OciClient,
    admin_js: JetStreamContext,
) -> None:
    event = await _commit(oci, unique, classifier().onnx)
    svc = build(_settings(nats_url, pg_dsn, registry_url, unique))
    async with svc.running():
        await admin_js.publish(
            s.MODEL_COMMITTED, event.to_json(), headers={MSG_ID_HEADER: str(event.event_id)}
        )
        built = await eventually(
            lambda: _events(admin_js, s.IMAGE_BUILT, event.model, ImageBuilt), what="image.built"
        )
        second = event.model_copy(update={"version": "2", "event_id": uuid.uuid4()})
        await admin_js.publish(
            s.MODEL_COMMITTED, second.to_json(), headers={MSG_ID_HEADER: str(second.event_id)}
        )
        both = await eventually(
            lambda: _two_built(admin_js, event.model),
            what="the second image.built",
        )
    assert len(built) == 1
    img = built[0]
    repo = img.image.split("/", 1)[1]
    assert img.model_digest == event.model_artifact.digest
    claims = await verify_image(oci, repo, img.digest, load_public_key(PUBLIC))
    assert claims["critical"]["identity"]["docker-reference"] == repo
    # the signature carries the release claims agents enforce anti-rollback on
    assert SignedRelease.from_claims(claims) == SignedRelease(event.model, "1", 1)
    later = await verify_image(oci, repo, both[1].digest, load_public_key(PUBLIC))
    assert SignedRelease.from_claims(later) == SignedRelease(event.model, "2", 2)
    manifest = json.loads(await read_layer_file(oci, repo, img.digest, "model/model.json"))
    assert manifest["kind"] == "classifier"
    assert manifest["thresholds"] == {"accuracy": 0.9}
    assert await read_layer_file(oci, repo, img.digest, "model/model.onnx") == classifier().onnx

    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    out = subprocess.run(  # noqa: ASYNC221 (a short CLI call in a test)
        [skopeo, "inspect", "--tls-verify=false", f"docker://{img.image}:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    info = json.loads(out.stdout)
    assert info["Digest"] == img.digest
    assert info["Labels"]["edgeloop.source_commit"] == "c0ffee"
    assert info["Labels"]["edgeloop.version"] == "1"


async def test_builds_are_reproducible(oci: OciClient, unique: str) -> None:
    event = await _commit(oci, unique, classifier().onnx)
    builder = Builder(oci, load_private_key(PRIVATE), image_prefix=f"t{unique}/images")
    first = await builder.build(event, release=1)
    second = await builder.build(event.model_copy(update={"event_id": event.event_id}), release=1)
    assert first.event.digest == second.event.digest
    changed = await builder.build(event.model_copy(update={"source_commit": "other"}), release=2)
    assert changed.event.digest != first.event.digest


async def test_missing_artifact_is_retried_then_reported_failed(
    nats_url: str,
    pg_dsn: str,
    registry_url: str,
    unique: str,
    oci: OciClient,
    admin_js: JetStreamContext,
) -> None:
    event = await _commit(oci, unique, classifier().onnx)
    gone = event.model_copy(
        update={"model_artifact": ArtifactRef(digest="sha256:" + "9" * 64, size=1, media_type="x")}
    )
    svc = build(_settings(nats_url, pg_dsn, registry_url, unique))
    async with svc.running():
        await admin_js.publish(s.MODEL_COMMITTED, gone.to_json())
        failed = await eventually(
            lambda: _events(admin_js, s.IMAGE_BUILD_FAILED, gone.model, ImageBuildFailed),
            what="image.build_failed",
        )
    assert failed[0].attempts == 3
    assert "not found" in failed[0].reason


async def test_bytes_that_are_not_a_model_fail_at_once(
    nats_url: str,
    pg_dsn: str,
    registry_url: str,
    unique: str,
    oci: OciClient,
    admin_js: JetStreamContext,
) -> None:
    event = await _commit(oci, unique, b"definitely not onnx")
    svc = build(_settings(nats_url, pg_dsn, registry_url, unique))
    async with svc.running():
        await admin_js.publish(s.MODEL_COMMITTED, event.to_json())
        failed = await eventually(
            lambda: _events(admin_js, s.IMAGE_BUILD_FAILED, event.model, ImageBuildFailed),
            what="image.build_failed",
        )
    assert failed[0].attempts == 1
    assert "onnxruntime" in failed[0].reason


async def test_registry_down_then_failed(
    nats_url: str, pg_dsn: str, unique: str, admin_js: JetStreamContext
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    event = ModelCommitted(
        model=f"m{unique}",
        version="1",
        repository="x/y",
        model_artifact=ArtifactRef(digest="sha256:" + "8" * 64, size=1, media_type="x"),
    )
    svc = build(_settings(nats_url, pg_dsn, dead, unique))
    async with svc.running():
        await admin_js.publish(s.MODEL_COMMITTED, event.to_json())
        failed = await eventually(
            lambda: _events(admin_js, s.IMAGE_BUILD_FAILED, event.model, ImageBuildFailed),
            within=60,
            what="image.build_failed",
        )
    assert failed[0].attempts == 3
    assert "RegistryUnavailable" in failed[0].reason
