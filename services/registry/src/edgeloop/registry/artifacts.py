"""The registry's artifacts in the OCI registry: one blob per file and an artifact manifest
(``artifactType`` edgeloop model) that references them all, so the registry's garbage
collector keeps them and a client can find every file of a version from one digest."""

from __future__ import annotations

import json
from collections.abc import Sequence

from edgeloop.contracts.events import ArtifactRef
from edgeloop.kit.oci import OciClient, OciError, RegistryUnavailable
from edgeloop.kit.oci.client import MANIFEST_OCI
from edgeloop.kit.oci.signing import EMPTY_MEDIA
from edgeloop.registry.errors import Unavailable
from edgeloop.registry.service import ArtifactFile, StoredArtifacts

MODEL_ARTIFACT = "application/vnd.edgeloop.model.v1"
FILE_ANNOTATION = "org.opencontainers.image.title"


class OciArtifactStore:
    """ArtifactStore on an OCI Distribution registry."""

    def __init__(self, client: OciClient) -> None:
        self.client = client

    async def store(
        self,
        repository: str,
        tag: str,
        files: Sequence[ArtifactFile],
        annotations: dict[str, str],
    ) -> StoredArtifacts:
        """Push every file, then the artifact manifest tagged ``tag``."""
        try:
            refs: dict[str, ArtifactRef] = {}
            layers = []
            for f in files:
                desc = await self.client.push_blob(repository, f.data, f.media_type)
                refs[f.name] = ArtifactRef(
                    digest=desc.digest, size=desc.size, media_type=f.media_type
                )
                layers.append({**desc.as_dict(), "annotations": {FILE_ANNOTATION: f.name}})
            empty = await self.client.push_blob(repository, b"{}", EMPTY_MEDIA)
            manifest = {
                "schemaVersion": 2,
                "mediaType": MANIFEST_OCI,
                "artifactType": MODEL_ARTIFACT,
                "config": empty.as_dict(),
                "layers": layers,
                "annotations": {k: v for k, v in sorted(annotations.items()) if v},
            }
            body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
            digest = await self.client.put_manifest(repository, tag, body)
        except RegistryUnavailable as exc:
            raise Unavailable(f"the module store is unavailable, try again: {exc}") from exc
        except OciError as exc:
            raise Unavailable(f"the module store refused the artifacts: {exc}") from exc
        return StoredArtifacts(digest, refs)
