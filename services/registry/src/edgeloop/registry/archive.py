"""Archival: a retired version older than the retention loses its bytes in the module
store — its artifact manifest, its image and the image's signature are deleted through
the Distribution API (by digest, which deletes their tags too), so ``registry
garbage-collect`` can reclaim the blobs — and becomes ``archived``. Its metadata (the
version row, lineage, validation report, audit records) stays."""

from __future__ import annotations

import logging
from typing import Any

from edgeloop.contracts.twin import image_repository
from edgeloop.kit.oci import ManifestNotFound, OciClient
from edgeloop.kit.oci.signing import signature_tag
from edgeloop.registry.store import PgStore

log = logging.getLogger(__name__)


class Archiver:
    """Archives retired versions once ``retention_seconds`` have passed."""

    def __init__(self, store: PgStore, oci: OciClient, retention_seconds: float) -> None:
        self.store = store
        self.oci = oci
        self.retention_seconds = retention_seconds

    async def sweep(self) -> int:
        """Archive every version that is due; how many."""
        n = 0
        while rec := await self.store.archive_due(self.retention_seconds, self.delete):
            log.info("%s@%s archived", rec["model"], rec["version"])
            n += 1
        return n

    async def delete(self, rec: dict[str, Any], keep: set[str]) -> list[str]:
        """Delete the version's manifests but those in ``keep``; ``repository@digest`` of
        each one deleted. One already gone (a sweep cut off half-way) is skipped."""
        build = rec.get("build_detail") or {}
        targets = [(rec["repository"], rec["artifact_manifest"])]
        if build.get("image") and build.get("digest"):
            repo = image_repository(build["image"])
            targets.append((repo, build["digest"]))
            try:
                sig = await self.oci.resolve(repo, signature_tag(build["digest"]))
                targets.append((repo, sig.digest))
            except ManifestNotFound:
                pass
        deleted = []
        for repo, digest in targets:
            if not digest or digest in keep:
                continue
            try:
                await self.oci.delete_manifest(repo, digest)
            except ManifestNotFound:
                continue
            deleted.append(f"{repo}@{digest}")
        return deleted
