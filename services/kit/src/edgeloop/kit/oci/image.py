"""Daemonless, reproducible OCI images of a model.

The same inputs give byte-identical layer, config and manifest, hence the same manifest
digest: tar entries are sorted, every entry has the same mtime (``created``, 0 by
default, as SOURCE_DATE_EPOCH would set it), uid/gid 0, no user or group names and fixed
modes, in plain USTAR (no PAX headers, which would carry varying data); gzip runs with
mtime 0, no file name and a fixed level; JSON is written with sorted keys and no
timestamp but ``created``.

One caveat: the gzip bytes (so the layer and manifest digests, not the layer's diff_id)
depend on the zlib build too, so "the same inputs" includes the same zlib. Builds of one
deployment share a container image, hence one zlib.

The model layer goes on top of an optional runtime base image from the same registry,
whose layers are reused by digest (mounted across repositories, never re-built).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import posixpath
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from edgeloop.kit.oci.client import (
    INDEX_TYPES,
    MANIFEST_DOCKER,
    MANIFEST_OCI,
    Descriptor,
    ManifestNotFound,
    OciClient,
    OciError,
    check_digest,
    sha256,
)

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
CONFIG_OCI = "application/vnd.oci.image.config.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
# A Docker-built base layer is the same bytes as an OCI one; an OCI manifest must name it
# with the OCI media type.
_TO_OCI_LAYER = {
    DOCKER_LAYER_GZIP: LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": LAYER_TAR,
}
BASE_NAME = "org.opencontainers.image.base.name"
BASE_DIGEST = "org.opencontainers.image.base.digest"
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"


def _json(obj: Any) -> bytes:
    """Canonical JSON: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _timestamp(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _normalize(path: str) -> str:
    """A layer path: relative, '/'-separated, no '.' or '..' components."""
    clean = posixpath.normpath(path.replace("\\", "/")).lstrip("/")
    if clean in ("", ".") or clean == ".." or clean.startswith("../"):
        raise ValueError(f"invalid path in an image layer: {path!r}")
    return clean


def reproducible_layer(
    files: Mapping[str, bytes | Path], *, mtime: int = 0, mode: int = 0o644
) -> tuple[bytes, str]:
    """A deterministic gzip'd tar of ``files`` (layer path → bytes or a file to read).

    Parent directories get their own entries (0755), as image tools expect. A file
    given as a ``Path`` is read in chunks, never whole.

    Returns:
        (the gzip'd tar, its diff_id: ``sha256:`` of the uncompressed tar).

    Raises:
        ValueError: a path is empty or climbs out with '..', two paths are the same
            after normalization, or a path is both a file and a directory.
    """
    entries: dict[str, bytes | Path] = {}
    for raw_path, content in files.items():
        path = _normalize(raw_path)
        if path in entries:
            raise ValueError(f"two files map to the layer path {path!r}")
        entries[path] = content
    dirs: set[str] = set()
    for p in entries:
        d = posixpath.dirname(p)
        while d:  # every ancestor gets an entry, not just the immediate parent
            dirs.add(d)
            d = posixpath.dirname(d)
    if clash := dirs & entries.keys():
        raise ValueError(f"layer paths are both a file and a directory: {sorted(clash)}")
    h = hashlib.sha256()
    out = io.BytesIO()
    # The tar is spooled (to disk past 32 MiB), then hashed and compressed in one pass,
    # so memory holds the compressed layer and one chunk, not the model twice.
    with tempfile.SpooledTemporaryFile(max_size=32 << 20) as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted([*dirs, *entries]):
                info = tarfile.TarInfo(name)
                info.mtime = mtime
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if name in dirs:
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                    continue
                content = entries[name]
                info.mode = mode
                if isinstance(content, Path):
                    info.size = content.stat().st_size
                    with content.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
        raw.seek(0)
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
            while chunk := raw.read(1 << 20):
                h.update(chunk)
                gz.write(chunk)
    return out.getvalue(), "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class BaseImage:
    """A runtime base image in the registry: its layers, config and where it lives."""

    repository: str
    layers: list[Descriptor]
    diff_ids: list[str]
    config: dict[str, Any]
    digest: str | None = None
    """Manifest digest of the base (recorded in the model image's annotations)."""

    @classmethod
    async def from_registry(
        cls, client: OciClient, repo: str, ref: str, *, platform: str = "linux/amd64"
    ) -> BaseImage:
        """Read a base image's manifest and config (both verified by digest).

        Args:
            client: The registry.
            repo: Repository of the base image.
            ref: Its tag or digest; an index (multi-platform image) is resolved to the
                manifest of ``platform``.
            platform: ``os/architecture[/variant]`` to pick from an index.

        Raises:
            ManifestNotFound: no such image, or no manifest for ``platform``.
            OciError: the config does not list one diff_id per layer.
        """
        raw, media_type, digest = await client.get_manifest(repo, ref)
        raw, media_type, digest = await _platform_manifest(
            client, repo, ref, raw, media_type, digest, platform
        )
        manifest = json.loads(raw)
        config = json.loads(await client.get_blob(repo, manifest["config"]["digest"]))
        layers = [Descriptor.from_dict(m) for m in manifest["layers"]]
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        if len(diff_ids) != len(layers):
            raise OciError(
                f"base image {repo}:{ref} has {len(layers)} layers but {len(diff_ids)} "
                "diff_ids in its config"
            )
        return cls(repo, layers, diff_ids, config, digest)


async def _platform_manifest(
    client: OciClient,
    repo: str,
    ref: str,
    raw: bytes,
    media_type: str,
    digest: str,
    platform: str,
) -> tuple[bytes, str, str]:
    """The image manifest itself, or the one for ``platform`` when ``raw`` is an index."""
    if media_type not in INDEX_TYPES:
        return raw, media_type, digest
    wanted = platform.split("/")
    for entry in json.loads(raw).get("manifests", []):
        p = entry.get("platform") or {}
        have = [p.get("os"), p.get("architecture"), *([p["variant"]] if "variant" in p else [])]
        if have[: len(wanted)] == wanted:
            return await client.get_manifest(repo, check_digest(entry["digest"]))
    raise ManifestNotFound(f"{repo}:{ref} is an index with no manifest for {platform}")


@dataclass(frozen=True)
class BuiltImage:
    """An image ready to push: its manifest, config and model layer, with digests."""

    manifest: bytes
    digest: str
    """Digest of ``manifest``: the image's identity."""
    config: bytes
    layer: bytes
    """The model layer (gzip'd tar)."""
    layer_descriptor: Descriptor
    base: BaseImage | None = None

    @property
    def size(self) -> int:
        """Manifest, config and every layer, in bytes (what a full pull moves)."""
        return manifest_total_size(self.manifest)

    @property
    def descriptor(self) -> Descriptor:
        """The descriptor of the manifest (e.g. a signature's subject)."""
        return Descriptor(MANIFEST_OCI, self.digest, len(self.manifest))


def manifest_total_size(manifest: bytes) -> int:
    """Bytes of an image manifest plus its config and layers, from the manifest alone."""
    m = json.loads(manifest)
    return len(manifest) + int(m["config"]["size"]) + sum(int(x["size"]) for x in m["layers"])


def build_model_image(
    files: Mapping[str, bytes | Path],
    *,
    annotations: Mapping[str, str],
    labels: Mapping[str, str] | None = None,
    base: BaseImage | None = None,
    created: int = 0,
    cmd: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> BuiltImage:
    """Build an image: ``base``'s layers (if any) plus one reproducible layer of ``files``.

    Without a base the image holds the model layer only (like an OCI artifact, but a
    valid image that ``skopeo`` and container engines accept).

    Args:
        files: Layer path (e.g. ``model/model.onnx``) → bytes, or a file to read.
        annotations: Manifest annotations, taken as given (``org.opencontainers.image.*``
            and ``edgeloop.*``); the base's name and digest are added when there is one.
        labels: ``config.Labels`` (merged over the base's).
        base: Runtime base image from the same registry.
        created: Epoch seconds used as every tar entry's mtime and the config's
            ``created`` (a SOURCE_DATE_EPOCH); fixed, so rebuilding gives the same digest.
        cmd: ``config.Cmd``; the base's when not given.
        env: Variables added to (or replacing those of) the base's ``config.Env``.

    Returns:
        The image, not yet pushed (see :func:`push_image`).
    """
    layer, diff_id = reproducible_layer(files, mtime=created)
    layer_desc = Descriptor(LAYER_GZIP, sha256(layer), len(layer))
    base_config: dict[str, Any] = dict(base.config) if base else {}
    run: dict[str, Any] = dict(base_config.get("config") or {})
    extra_env = dict(env or {})
    run_env = [e for e in run.get("Env") or [] if e.split("=", 1)[0] not in extra_env]
    run_env += [f"{k}={v}" for k, v in sorted(extra_env.items())]
    run_labels = {**(run.get("Labels") or {}), **(labels or {})}
    for key, value in (("Env", run_env), ("Labels", run_labels)):
        if value:
            run[key] = value
        else:
            run.pop(key, None)
    if cmd:
        run["Cmd"] = list(cmd)
    when = _timestamp(created)
    config: dict[str, Any] = {
        "architecture": base_config.get("architecture", "amd64"),
        "os": base_config.get("os", "linux"),
        "created": when,
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [*(base.diff_ids if base else []), diff_id]},
        "history": [
            *(base_config.get("history") or []),
            {"created": when, "created_by": "edgeloop build_model_image", "comment": "model"},
        ],
    }
    if "variant" in base_config:
        config["variant"] = base_config["variant"]
    config_bytes = _json(config)
    base_layers = [
        Descriptor(_TO_OCI_LAYER.get(d.media_type, d.media_type), d.digest, d.size, d.annotations)
        for d in (base.layers if base else [])
    ]
    all_annotations = dict(annotations)
    if base is not None:
        all_annotations.setdefault(BASE_NAME, base.repository)
        if base.digest:
            all_annotations.setdefault(BASE_DIGEST, base.digest)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_OCI,
        "config": Descriptor(CONFIG_OCI, sha256(config_bytes), len(config_bytes)).as_dict(),
        "layers": [d.as_dict() for d in [*base_layers, layer_desc]],
    }
    if all_annotations:
        manifest["annotations"] = dict(sorted(all_annotations.items()))
    manifest_bytes = _json(manifest)
    return BuiltImage(manifest_bytes, sha256(manifest_bytes), config_bytes, layer, layer_desc, base)


async def push_image(
    client: OciClient, repo: str, image: BuiltImage, tag: str | None = None
) -> str:
    """Push an image: blobs first (base layers mounted), then the manifest.

    Args:
        client: The registry.
        repo: Target repository.
        image: The built image.
        tag: Tag to put the manifest under; without one it is stored by digest only.

    Returns:
        The manifest digest (``image.digest``).
    """
    if image.base is not None:
        for layer in image.base.layers:
            if not await client.blob_exists(repo, layer.digest):
                await client.mount_blob(repo, layer.digest, image.base.repository)
    await client.push_blob(repo, image.layer, LAYER_GZIP)
    await client.push_blob(repo, image.config, CONFIG_OCI)
    return await client.put_manifest(repo, tag or image.digest, image.manifest)


async def image_exists(client: OciClient, repo: str, digest: str) -> bool:
    """Whether the manifest ``digest`` is in ``repo``."""
    try:
        await client.resolve(repo, digest)
    except ManifestNotFound:
        return False
    return True


async def pull_file(client: OciClient, repo: str, ref: str, path: str) -> bytes:
    """A file from an image's layers, as the image's filesystem has it.

    Layers are read top-down, so the topmost copy wins and a whiteout (``.wh.<name>``
    or an opaque directory) hides lower ones, as a container runtime would see it. Every
    blob is verified against its digest; a layer is spooled to a temporary file, not
    held in memory.

    Args:
        client: The registry.
        repo: Repository.
        ref: Tag or manifest digest (an index resolves to linux/amd64).
        path: Path in the image, e.g. ``model/model.onnx``.

    Returns:
        The file's bytes.

    Raises:
        FileNotFoundError: no layer has the file (or it is deleted by a whiteout).
        ManifestNotFound: no such image.
        OciError: a layer in a compression this reader does not know (e.g. zstd).
    """
    target = _normalize(path)
    raw, media_type, digest = await client.get_manifest(repo, ref)
    raw, media_type, digest = await _platform_manifest(
        client, repo, ref, raw, media_type, digest, "linux/amd64"
    )
    if media_type not in (MANIFEST_OCI, MANIFEST_DOCKER):
        raise OciError(f"{repo}@{ref} is a {media_type}, not an image manifest")
    for entry in reversed(json.loads(raw)["layers"]):
        layer = Descriptor.from_dict(entry)
        compression = _compression(layer.media_type)
        with tempfile.TemporaryFile() as spool:
            async for chunk in client.iter_blob(repo, layer.digest):
                spool.write(chunk)  # iter_blob has verified the digest once it ends
            found, data = await asyncio.to_thread(_find_in_layer, spool, compression, target)
        if found == "file" and data is not None:
            return data
        if found == "deleted":
            break
    raise FileNotFoundError(f"{target} is not in any layer of {repo}@{digest}")


def _compression(media_type: str) -> str:
    if media_type.endswith(("gzip", "+gzip")):
        return "gz"
    if media_type.endswith((".tar", "tar")):
        return ""
    raise OciError(f"layer media type {media_type} is not supported (gzip or plain tar only)")


def _find_in_layer(spool: IO[bytes], compression: str, target: str) -> tuple[str, bytes | None]:
    """("file", bytes) | ("deleted", None) | ("absent", None) for ``target`` in a layer."""
    spool.seek(0)
    parents = [target.rsplit("/", i)[0] for i in range(1, target.count("/") + 1)]
    # A whiteout of the file or of any directory above it hides lower layers' copies, as
    # does an opaque-directory marker in any directory above it.
    hidden = {
        posixpath.join(posixpath.dirname(p), _WHITEOUT + posixpath.basename(p))
        for p in [target, *parents]
    }
    hidden |= {f"{p}/{_OPAQUE}" for p in parents}
    result: tuple[str, bytes | None] = ("absent", None)
    mode: Literal["r:gz", "r:"] = "r:gz" if compression == "gz" else "r:"
    with tarfile.open(fileobj=spool, mode=mode) as tar:
        for member in tar:
            name_in = _member_name(member.name)
            if name_in == target:
                if not member.isfile():
                    raise OciError(f"{target} is not a regular file in its layer")
                extracted = tar.extractfile(member)
                result = ("file", extracted.read() if extracted else b"")
            elif name_in in hidden and result[0] != "file":
                result = ("deleted", None)
    return result


def _member_name(name: str) -> str:
    """A tar member's path without a leading ``./`` or ``/`` (Docker layers vary)."""
    while name.startswith(("./", "/")):
        name = name[1:] if name.startswith("/") else name[2:]
    return name.rstrip("/")


# The validator and builder read files with this name; ``pull_file`` is the one name
# new code should use.
read_layer_file = pull_file
