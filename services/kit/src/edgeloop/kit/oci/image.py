"""Daemonless, reproducible OCI images of a model.

The same inputs give byte-identical layers, config and manifest, hence the same manifest
digest: tar entries are sorted, with mtime 0, uid/gid 0, fixed modes and no user names;
gzip runs with mtime 0 and no file name; JSON is written with sorted keys and no
timestamps. The model layer goes on top of an optional runtime base image from the
same registry (its layers are reused by digest).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any

from edgeloop.kit.oci.client import MANIFEST_OCI, Descriptor, ManifestNotFound, OciClient, sha256

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_OCI = "application/vnd.oci.image.config.v1+json"


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def reproducible_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """(gzip'd tar, diff_id) of ``files`` (path → bytes), deterministic."""
    raw = io.BytesIO()
    dirs = sorted({p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)})
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 0
            tar.addfile(info)
        for path in sorted(files):
            data = files[path]
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=6) as f:
        f.write(tar_bytes)
    return gz.getvalue(), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


@dataclass(frozen=True)
class BaseImage:
    """A runtime base image in the registry: its layers and config."""

    repository: str
    layers: list[Descriptor]
    diff_ids: list[str]
    config: dict[str, Any]

    @classmethod
    async def from_registry(cls, client: OciClient, repo: str, ref: str) -> BaseImage:
        """Read a base image's manifest and config."""
        raw, _, _ = await client.get_manifest(repo, ref)
        manifest = json.loads(raw)
        config = json.loads(await client.get_blob(repo, manifest["config"]["digest"]))
        layers = [Descriptor(m["mediaType"], m["digest"], m["size"]) for m in manifest["layers"]]
        return cls(repo, layers, list(config.get("rootfs", {}).get("diff_ids", [])), config)


@dataclass(frozen=True)
class BuiltImage:
    """An image ready to push: blobs by digest, manifest bytes and digest."""

    manifest: bytes
    digest: str
    config: bytes
    layer: bytes
    layer_descriptor: Descriptor
    base: BaseImage | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Manifest, config and every layer, in bytes."""
        m = json.loads(self.manifest)
        return (
            len(self.manifest) + int(m["config"]["size"]) + sum(int(x["size"]) for x in m["layers"])
        )


def build_model_image(
    files: dict[str, bytes],
    *,
    annotations: dict[str, str],
    labels: dict[str, str] | None = None,
    base: BaseImage | None = None,
    cmd: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> BuiltImage:
    """The image: ``base``'s layers (if any) plus one layer with ``files``."""
    layer, diff_id = reproducible_layer(files)
    layer_desc = Descriptor(LAYER_GZIP, sha256(layer), len(layer))
    base_cfg = dict(base.config.get("config", {})) if base else {}
    base_env = [e for e in base_cfg.get("Env", []) if e.split("=", 1)[0] not in (env or {})]
    config = {
        "architecture": base.config.get("architecture", "amd64") if base else "amd64",
        "os": "linux",
        "config": {
            **base_cfg,
            "Labels": {**base_cfg.get("Labels", {}), **(labels or {})},
            "Env": base_env + [f"{k}={v}" for k, v in sorted((env or {}).items())],
            **({"Cmd": cmd} if cmd else {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [*(base.diff_ids if base else []), diff_id]},
        "created": "1970-01-01T00:00:00Z",
    }
    config_bytes = _json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_OCI,
        "config": Descriptor(CONFIG_OCI, sha256(config_bytes), len(config_bytes)).as_dict(),
        "layers": [d.as_dict() for d in (base.layers if base else [])] + [layer_desc.as_dict()],
        "annotations": dict(sorted(annotations.items())),
    }
    manifest_bytes = _json(manifest)
    return BuiltImage(manifest_bytes, sha256(manifest_bytes), config_bytes, layer, layer_desc, base)


async def push_image(
    client: OciClient, repo: str, image: BuiltImage, tag: str | None = None
) -> str:
    """Push blobs (base layers mounted from the base repository), then the manifest."""
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
        await client.get_manifest(repo, digest)
    except ManifestNotFound:
        return False
    return True


async def read_layer_file(client: OciClient, repo: str, ref: str, path: str) -> bytes:
    """A file from the image's layers (the topmost wins), every blob verified."""
    raw, _, _ = await client.get_manifest(repo, ref)
    manifest = json.loads(raw)
    for layer in reversed(manifest["layers"]):
        blob = await client.get_blob(repo, layer["digest"])
        gzipped = str(layer["mediaType"]).endswith("gzip")
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz" if gzipped else "r:") as tar:
            try:
                member = tar.getmember(path)
            except KeyError:
                continue
            extracted = tar.extractfile(member)
            if extracted is not None:
                return bytes(extracted.read())
    raise FileNotFoundError(f"{path} is not in any layer of {repo}@{ref}")
