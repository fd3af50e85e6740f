"""An async client of the OCI Distribution API (the module store).

Everything is content-addressed: uploads are checked against their sha256 and every
download is verified before it is returned. Connection errors and 5xx answers are retried
with exponential back-off a bounded number of times, then raised as
``RegistryUnavailable``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MANIFEST_OCI = "application/vnd.oci.image.manifest.v1+json"
INDEX_OCI = "application/vnd.oci.image.index.v1+json"
MANIFEST_DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT_MANIFESTS = ", ".join((MANIFEST_OCI, INDEX_OCI, MANIFEST_DOCKER))

_REPO_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 8 << 20


class OciError(Exception):
    """A registry answered something unexpected."""


class RegistryUnavailable(OciError):
    """The registry is down or failing (after retries)."""


class BlobNotFound(OciError):
    """No blob with that digest in the repository."""


class ManifestNotFound(OciError):
    """No manifest with that tag or digest in the repository."""


class DigestMismatch(OciError):
    """Bytes do not hash to the digest they were asked for (tampering or corruption)."""


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        return out


def _with_digest(location: str, digest: str) -> str:
    """The upload URL with ``digest=`` added (it already carries the registry's state)."""
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def sha256(data: bytes) -> str:
    """``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_repository(repo: str) -> str:
    """Refuse a repository name the Distribution spec does not allow."""
    if not _REPO_RE.match(repo):
        raise ValueError(f"invalid OCI repository name {repo!r}")
    return repo


def check_digest(digest: str) -> str:
    """Refuse anything but ``sha256:<64 hex>``."""
    if not _DIGEST_RE.match(digest):
        raise ValueError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return digest


class OciClient:
    """Client of one registry (``http://host:port``)."""

    def __init__(
        self, base_url: str, *, timeout: float = 60, retries: int = 4, backoff: float = 0.25
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.host = self.base_url.split("://", 1)[-1]
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        self._retries = retries
        self._backoff = backoff

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> OciClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        delay = self._backoff
        for attempt in range(self._retries + 1):
            try:
                resp = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                error: str = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 500:
                    return resp
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            if attempt == self._retries:
                raise RegistryUnavailable(
                    f"OCI registry {self.base_url} failed {method} {url} "
                    f"after {attempt + 1} attempts: {error}"
                )
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def ping(self) -> bool:
        """Whether the registry answers ``/v2/``."""
        try:
            return (await self._request("GET", "/v2/")).status_code == 200
        except RegistryUnavailable:
            return False

    # --- blobs ---------------------------------------------------------------------

    async def blob_exists(self, repo: str, digest: str) -> bool:
        """HEAD the blob."""
        resp = await self._request(
            "HEAD", f"/v2/{check_repository(repo)}/blobs/{check_digest(digest)}"
        )
        return resp.status_code == 200

    async def push_blob(
        self, repo: str, data: bytes | Path, media_type: str = "application/octet-stream"
    ) -> Descriptor:
        """Upload a blob (skipped when present); bytes at once, a file in chunks."""
        check_repository(repo)
        if isinstance(data, Path):
            return await self._push_file(repo, data, media_type)
        digest = sha256(data)
        if not await self.blob_exists(repo, digest):
            location = await self._start_upload(repo)
            resp = await self._request(
                "PUT",
                _with_digest(location, digest),
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            self._expect(resp, 201, f"upload of {digest} to {repo}")
        return Descriptor(media_type, digest, len(data))

    async def _push_file(self, repo: str, path: Path, media_type: str) -> Descriptor:
        h = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        digest = "sha256:" + h.hexdigest()
        if await self.blob_exists(repo, digest):
            return Descriptor(media_type, digest, size)
        location = await self._start_upload(repo)
        offset = 0
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                resp = await self._request(
                    "PATCH",
                    location,
                    content=chunk,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                    },
                )
                self._expect(resp, 202, f"chunk upload of {path.name}")
                location = resp.headers["Location"]
                offset += len(chunk)
        resp = await self._request("PUT", _with_digest(location, digest))
        self._expect(resp, 201, f"upload of {path.name}")
        return Descriptor(media_type, digest, size)

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> None:
        """Make a blob of ``from_repo`` available in ``repo`` without moving its bytes."""
        resp = await self._request(
            "POST",
            f"/v2/{check_repository(repo)}/blobs/uploads/",
            params={"mount": check_digest(digest), "from": check_repository(from_repo)},
        )
        if resp.status_code == 201:
            return
        if resp.status_code == 202:  # mount refused: copy the bytes
            await self.push_blob(repo, await self.get_blob(from_repo, digest))
            return
        self._expect(resp, 201, f"mount of {digest} from {from_repo}")

    async def _start_upload(self, repo: str) -> str:
        resp = await self._request("POST", f"/v2/{repo}/blobs/uploads/")
        self._expect(resp, 202, f"upload session in {repo}")
        return str(resp.headers["Location"])

    async def get_blob(
        self, repo: str, digest: str, offset: int = 0, length: int | None = None
    ) -> bytes:
        """A blob's bytes; the whole blob is verified against its digest.

        With ``offset``/``length`` only that range is returned (not verifiable alone:
        the caller verifies the assembled blob, as a resuming download does).
        """
        url = f"/v2/{check_repository(repo)}/blobs/{check_digest(digest)}"
        headers = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        resp = await self._request("GET", url, headers=headers, follow_redirects=True)
        if resp.status_code == 404:
            raise BlobNotFound(f"blob {digest} not found in {repo}")
        self._expect(resp, 206 if headers else 200, f"download of {digest}")
        if not headers and sha256(resp.content) != digest:
            raise DigestMismatch(f"blob {digest} from {repo} hashes to {sha256(resp.content)}")
        return resp.content

    async def iter_blob(
        self, repo: str, digest: str, offset: int = 0, chunk: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """Stream a blob from ``offset`` in chunks (for resumable downloads)."""
        url = f"/v2/{check_repository(repo)}/blobs/{check_digest(digest)}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        async with self._http.stream("GET", url, headers=headers, follow_redirects=True) as resp:
            if resp.status_code == 404:
                raise BlobNotFound(f"blob {digest} not found in {repo}")
            if resp.status_code not in (200, 206):
                raise OciError(f"download of {digest}: HTTP {resp.status_code}")
            async for data in resp.aiter_bytes(chunk):
                yield data

    # --- manifests -----------------------------------------------------------------

    async def put_manifest(
        self, repo: str, ref: str, manifest: bytes, media_type: str = MANIFEST_OCI
    ) -> str:
        """Store a manifest under a tag or its digest; returns its digest."""
        resp = await self._request(
            "PUT",
            f"/v2/{check_repository(repo)}/manifests/{ref}",
            content=manifest,
            headers={"Content-Type": media_type},
        )
        self._expect(resp, 201, f"manifest {ref} of {repo}")
        digest = sha256(manifest)
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise DigestMismatch(f"registry stored manifest {ref} as {returned}, not {digest}")
        return digest

    async def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest by tag or digest, verified."""
        resp = await self._request(
            "GET",
            f"/v2/{check_repository(repo)}/manifests/{ref}",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        if resp.status_code == 404:
            raise ManifestNotFound(f"manifest {ref} not found in {repo}")
        self._expect(resp, 200, f"manifest {ref} of {repo}")
        digest = sha256(resp.content)
        if ref.startswith("sha256:") and digest != ref:
            raise DigestMismatch(f"manifest {ref} from {repo} hashes to {digest}")
        return resp.content, resp.headers.get("Content-Type", MANIFEST_OCI), digest

    async def tag(self, repo: str, tag: str, digest: str) -> None:
        """Point ``tag`` at the manifest ``digest``."""
        manifest, media_type, _ = await self.get_manifest(repo, digest)
        await self.put_manifest(repo, tag, manifest, media_type)

    async def list_tags(self, repo: str) -> list[str]:
        """Tags of a repository ([] when it has none)."""
        resp = await self._request("GET", f"/v2/{check_repository(repo)}/tags/list")
        if resp.status_code == 404:
            return []
        self._expect(resp, 200, f"tags of {repo}")
        return list(resp.json().get("tags") or [])

    @staticmethod
    def _expect(resp: httpx.Response, status: int, what: str) -> None:
        if resp.status_code != status:
            raise OciError(f"{what}: HTTP {resp.status_code}: {resp.text[:300]}")
