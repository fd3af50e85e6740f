"""Build logic: a committed model version → a signed, reproducible OCI image.

No FastStream and no asyncpg here (the handler adapts); the OCI registry is the kit's
client. The same committed version always gives the same manifest digest.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeloop.builder.docker_backend import DockerBackend
from edgeloop.contracts.events import ImageBuilt, ModelCommitted
from edgeloop.contracts.signing import release_annotations
from edgeloop.contracts.thresholds import thresholds
from edgeloop.edge.runtime import ModelLoadError, OnnxModel
from edgeloop.kit.oci import OciClient
from edgeloop.kit.oci.image import (
    BaseImage,
    build_model_image,
    manifest_total_size,
    push_image,
)
from edgeloop.kit.oci.signing import attach_signature

MODEL_PATH = "model/model.onnx"
MANIFEST_PATH = "model/model.json"
PROFILE_PATH = "model/profile.json"
"""The reference profile: agents histogram their inputs into its bins."""


class BuildError(Exception):
    """The version cannot be built whatever the retries (e.g. the bytes are not a model)."""


def model_manifest(event: ModelCommitted, model: OnnxModel) -> dict[str, Any]:
    """``model.json``: what the runtime and the validator need to know about the model."""
    return {
        "schema_version": 1,
        "name": event.model,
        "version": event.version,
        **model.signature(),
        "labels": event.tags.get("labels", "").split(",") if event.tags.get("labels") else [],
        "thresholds": thresholds(event.params),
        "low_confidence": float(event.params.get("low_confidence", 0.6)),
        "source_commit": event.source_commit,
        "data_digest": event.data_digest,
        "model_digest": event.model_artifact.digest,
    }


@dataclass(frozen=True)
class BuildResult:
    """What was pushed."""

    event: ImageBuilt
    signature_digest: str


class Builder:
    """Builds, pushes and signs images."""

    def __init__(
        self,
        oci: OciClient,
        key: Ed25519PrivateKey,
        *,
        image_prefix: str,
        base_image: str | None = None,
        docker: DockerBackend | None = None,
    ) -> None:
        self.docker = docker
        self.oci = oci
        self.key = key
        self.image_prefix = image_prefix.strip("/")
        self.base_image = base_image

    def repository(self, model: str) -> str:
        """Where ``model``'s images go."""
        return f"{self.image_prefix}/{model}"

    async def build(self, event: ModelCommitted, *, release: int) -> BuildResult:
        """Fetch the model, build the image on the base, push, sign; the ImageBuilt event.

        The signature's payload carries the release claims (model, version and
        ``release``, the model's release counter, :func:`edgeloop.builder.store.next_release`):
        what agents enforce anti-rollback on. The image itself does not depend on
        ``release`` (it stays reproducible).
        """
        onnx = await self.oci.get_blob(event.repository, event.model_artifact.digest)
        try:
            model = await asyncio.to_thread(OnnxModel, onnx)
        except ModelLoadError as exc:
            raise BuildError(f"{event.model}@{event.version}: {exc}") from exc
        meta = {
            "org.opencontainers.image.title": event.model,
            "org.opencontainers.image.version": event.version,
            "org.opencontainers.image.revision": event.source_commit or "",
            "edgeloop.model": event.model,
            "edgeloop.version": event.version,
            "edgeloop.source_commit": event.source_commit or "",
            "edgeloop.data_digest": event.data_digest or "",
            "edgeloop.model_digest": event.model_artifact.digest,
        }
        files = {
            MODEL_PATH: onnx,
            MANIFEST_PATH: json.dumps(
                model_manifest(event, model), sort_keys=True, indent=1
            ).encode(),
        }
        if event.reference_artifact is not None:
            files[PROFILE_PATH] = await self.oci.get_blob(
                event.repository, event.reference_artifact.digest
            )
        repo = self.repository(event.model)
        if self.docker is not None:
            digest = await self.docker.build_and_push(
                f"{self.oci.host}/{repo}:{event.version}", files, meta
            )
            manifest, _, _ = await self.oci.get_manifest(repo, digest)
            size = manifest_total_size(manifest)
        else:
            base = None
            if self.base_image:
                base_repo, _, tag = self.base_image.rpartition(":")
                base = await BaseImage.from_registry(self.oci, base_repo, tag or "latest")
            image = build_model_image(
                files,
                annotations=meta,
                labels=meta,
                base=base,
                env={"EDGELOOP_MODEL_PATH": f"/{MODEL_PATH}"},
            )
            digest = await push_image(self.oci, repo, image, tag=event.version)
            size = image.size
        signature = await attach_signature(
            self.oci,
            repo,
            digest,
            self.key,
            annotations=release_annotations(event.model, event.version, release),
        )
        return BuildResult(
            ImageBuilt(
                model=event.model,
                version=event.version,
                image=f"{self.oci.host}/{repo}",
                digest=digest,
                size=size,
                signature_digest=signature,
                backend="docker" if self.docker is not None else "oci",
                model_digest=event.model_artifact.digest,
                source_repository=event.repository,
                suite_artifact=event.suite_artifact,
            ),
            signature,
        )
