"""Artifacts for devices: image manifests, blobs and signatures from the OCI registry,
cached on the gateway's disk so a thousand devices fetching one model cost one download.

Devices may fetch only what belongs to their desired image: its manifest, and the
config and layers that manifest names. Signed rotations of the image-signing key
(``edgeloop signing rotate``) are read from a directory and sent with every desired
state; devices verify them against the key they pinned.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from edgeloop.contracts.signing import SignatureError
from edgeloop.kit.oci import OciClient
from edgeloop.kit.oci.client import check_digest, sha256
from edgeloop.kit.oci.signing import fetch_signatures

log = logging.getLogger(__name__)

BYTES_SERVED = Counter(
    "edgeloop_gateway_artifact_bytes_served", "Artifact bytes sent to devices", ["kind"]
)


class NotAllowed(Exception):
    """The digest is not part of the device's desired image."""


@dataclass(frozen=True)
class Signature:
    """A stored signature of a manifest (verified by the agent, not here)."""

    payload: bytes
    signature: bytes
    key_id: str


@dataclass(frozen=True)
class ImageInfo:
    """What the gateway knows about one image manifest."""

    repository: str
    digest: str
    manifest: bytes
    media_type: str
    members: dict[str, tuple[str, int]]
    """Digest → (media type, size) of the config and every layer."""
    model_digest: str | None
    signature: Signature | None


class ArtifactCache:
    """Manifests and blobs of desired images, from the registry, cached locally."""

    def __init__(
        self,
        oci: OciClient,
        directory: Path,
        *,
        trusted_key_id: str | None = None,
        rotations_dir: Path | None = None,
    ):
        self.oci = oci
        self.directory = directory
        self.trusted_key_id = trusted_key_id
        self.rotations_dir = rotations_dir
        self._rotations: tuple[tuple[tuple[str, int, int], ...], list[tuple[bytes, bytes]]] = (
            (),
            [],
        )
        directory.mkdir(parents=True, exist_ok=True)
        self._images: dict[str, ImageInfo] = {}
        self._loading: dict[str, asyncio.Future[ImageInfo]] = {}
        self._blobs: dict[str, asyncio.Future[Path]] = {}
        for stray in directory.glob("*.partial"):
            with contextlib.suppress(OSError):
                stray.unlink()

    def key_rotations(self) -> list[tuple[bytes, bytes]]:
        """(payload, signature) of each rotation file (``*.json``: base64 ``payload`` and
        ``signature``) in ``rotations_dir``, re-read when a file changes. Not verified
        here: each device checks them against the key it pinned."""
        if self.rotations_dir is None:
            return []
        try:
            paths = sorted(self.rotations_dir.glob("*.json"))
            seen = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
        except OSError as exc:
            log.warning("key rotations in %s are unreadable: %s", self.rotations_dir, exc)
            return self._rotations[1]
        if seen != self._rotations[0]:
            found = []
            for path in paths:
                try:
                    body = json.loads(path.read_text())
                    found.append(
                        (
                            base64.b64decode(body["payload"], validate=True),
                            base64.b64decode(body["signature"], validate=True),
                        )
                    )
                except (OSError, ValueError, KeyError, TypeError, binascii.Error) as exc:
                    log.warning("key rotation %s is unreadable: %s (not sent)", path, exc)
            self._rotations = (seen, found)
        return self._rotations[1]

    async def image(self, repository: str, digest: str) -> ImageInfo:
        """The manifest (verified against ``digest``), its members and its signature."""
        check_digest(digest)
        key = f"{repository}@{digest}"
        if key in self._images:
            return self._images[key]
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[key] = pending
            try:
                info = await self._load(repository, digest)
            except BaseException as exc:
                pending.set_exception(exc)
                del self._loading[key]
                pending.exception()  # retrieved: nobody else may be waiting
                raise
            self._images[key] = info
            del self._loading[key]
            pending.set_result(info)
            return info
        return await asyncio.shield(pending)

    async def _load(self, repository: str, digest: str) -> ImageInfo:
        raw, media_type, _ = await self.oci.get_manifest(repository, digest)
        if sha256(raw) != digest:
            raise ValueError(f"manifest {digest} of {repository} hashes to {sha256(raw)}")
        manifest = json.loads(raw)
        members = {
            d["digest"]: (str(d["mediaType"]), int(d["size"]))
            for d in [manifest.get("config", {}), *manifest.get("layers", [])]
            if "digest" in d
        }
        annotations = manifest.get("annotations") or {}
        signature = None
        try:
            stored = await fetch_signatures(self.oci, repository, digest)
        except SignatureError as exc:
            log.warning("%s@%s: %s (devices will refuse it)", repository, digest, exc)
            stored = []
        chosen = next(
            (s for s in stored if self.trusted_key_id and s.claimed_key_id == self.trusted_key_id),
            stored[-1] if stored else None,
        )
        if chosen is not None:
            signature = Signature(chosen.payload, chosen.signature, chosen.claimed_key_id or "")
        return ImageInfo(
            repository=repository,
            digest=digest,
            manifest=raw,
            media_type=media_type,
            members=members,
            model_digest=annotations.get("edgeloop.model_digest"),
            signature=signature,
        )

    async def open(
        self, repository: str, manifest_digest: str, digest: str, offset: int, chunk: int
    ) -> tuple[str, int, AsyncIterator[bytes]]:
        """(media type, total size, chunks from ``offset``) of an artifact of an image.

        Raises:
            NotAllowed: ``digest`` is neither the manifest nor one of its members.
            ValueError: ``offset`` is beyond the artifact's end.
        """
        info = await self.image(repository, manifest_digest)
        if digest == manifest_digest:
            data = info.manifest
            if offset > len(data):
                raise ValueError(f"offset {offset} is beyond the end ({len(data)} bytes)")

            async def manifest_chunks() -> AsyncIterator[bytes]:
                for pos in range(offset, len(data), chunk):
                    BYTES_SERVED.labels("manifest").inc(min(chunk, len(data) - pos))
                    yield data[pos : pos + chunk]

            return info.media_type, len(data), manifest_chunks()
        if digest not in info.members:
            raise NotAllowed(f"{digest} is not part of {repository}@{manifest_digest}")
        media_type, size = info.members[digest]
        if offset > size:
            raise ValueError(f"offset {offset} is beyond the end ({size} bytes)")
        path = await self.blob(repository, digest)
        return media_type, size, _read_file(path, offset, chunk)

    async def blob(self, repository: str, digest: str) -> Path:
        """The blob in the local cache (downloaded once, however many devices ask)."""
        path = self.directory / digest.replace(":", "-")
        if path.exists():
            return path
        pending = self._blobs.get(digest)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._blobs[digest] = pending
            try:
                partial = path.with_suffix(".partial")
                await self.oci.download_blob(repository, digest, partial)
                os.replace(partial, path)
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()
                raise
            finally:
                del self._blobs[digest]
            pending.set_result(path)
            return path
        return await asyncio.shield(pending)


async def _read_file(path: Path, offset: int, chunk: int) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        f.seek(offset)
        while data := await asyncio.to_thread(f.read, chunk):
            BYTES_SERVED.labels("blob").inc(len(data))
            yield data
