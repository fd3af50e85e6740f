"""The Docker-engine build backend, with a real dockerd started by the test: the image
is built from a generated Dockerfile on a locally made base, pushed, signed, and run to
serve a prediction."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from nats.js import JetStreamContext

from edgeloop.builder.app import build
from edgeloop.builder.config import BuilderSettings
from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ArtifactRef, ImageBuilt, ModelCommitted
from edgeloop.devstack.docker_engine import DockerEngine, ensure_runtime_base
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import eventually, stream_messages
from edgeloop.edge.runtime import OnnxModel
from edgeloop.kit.oci import OciClient
from edgeloop.kit.oci.signing import generate_keypair, load_public_key, verify_image
from tests.modelzoo import classifier

pytestmark = pytest.mark.slow
PRIVATE, PUBLIC = generate_keypair()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("no Docker engine on this machine (apt-get install docker.io)")
    dockerd = DockerEngine(tmp_path_factory.mktemp("dockerd"))
    try:
        dockerd.start(timeout=60)
    except RuntimeError as exc:
        pytest.skip(f"dockerd cannot run on this machine: {str(exc)[-400:]}")
    site = Path(sys.modules["onnxruntime"].__file__ or "").parents[1]
    ensure_runtime_base(dockerd.host, site)
    yield dockerd
    dockerd.stop()


async def test_docker_backend_builds_an_image_that_serves_predictions(
    engine: DockerEngine,
    nats_url: str,
    pg_dsn: str,
    registry_url: str,
    unique: str,
    admin_js: JetStreamContext,
) -> None:
    m = classifier()
    async with OciClient(registry_url) as oci:
        repo = f"d{unique}/models/m"
        desc = await oci.push_blob(repo, m.onnx)
        event = ModelCommitted(
            model=f"dk{unique}",
            version="1",
            repository=repo,
            model_artifact=ArtifactRef(digest=desc.digest, size=desc.size, media_type="x"),
            source_commit="feedbeef",
        )
        settings = BuilderSettings(
            nats_url=nats_url,
            database_url=pg_dsn,
            oci_registry_url=registry_url,
            signing_key=PRIVATE.decode(),
            image_prefix=f"d{unique}/images",
            backend="docker",
            docker_host=engine.host,
        )
        svc = build(settings)
        async with svc.running():
            await admin_js.publish(s.MODEL_COMMITTED, event.to_json())

            async def built() -> list[ImageBuilt]:
                msgs = await stream_messages(admin_js, s.STREAM_LIFECYCLE, s.IMAGE_BUILT)
                evs = [ImageBuilt.from_json(x.data) for x in msgs]
                return [e for e in evs if e.model == event.model]

            (img,) = await eventually(built, within=180, what="docker build and push")
        assert img.backend == "docker"
        image_repo = img.image.split("/", 1)[1]
        await verify_image(oci, image_repo, img.digest, load_public_key(PUBLIC))

    port = free_port()
    name = f"serve-{unique}"
    run = subprocess.run(  # noqa: ASYNC221
        [
            "docker",
            "-H",
            engine.host,
            "run",
            "-d",
            "--rm",
            "--name",
            name,
            "--network",
            "host",
            "-e",
            f"EDGELOOP_SERVE_PORT={port}",
            "-e",
            "EDGELOOP_SERVE_HOST=127.0.0.1",
            f"{img.image}@{img.digest}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    try:
        x = np.load(__import__("io").BytesIO(m.suite))["X"][:5]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            async def healthy() -> bool:
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(healthy, within=60, what="model server in the container")
            resp = await client.post("/v1/predict", json={"instances": x.tolist()})
        assert resp.status_code == 200, resp.text
        expected = OnnxModel(m.onnx).predict(x)
        assert resp.json()["predictions"] == expected.labels.tolist()  # type: ignore[union-attr]
        labels = json.loads(
            subprocess.run(  # noqa: ASYNC221
                [
                    "docker",
                    "-H",
                    engine.host,
                    "inspect",
                    "--format",
                    "{{json .Config.Labels}}",
                    f"{img.image}@{img.digest}",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert labels["edgeloop.source_commit"] == "feedbeef"
    finally:
        subprocess.run(  # noqa: ASYNC221
            ["docker", "-H", engine.host, "rm", "-f", name], capture_output=True
        )
