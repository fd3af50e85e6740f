"""An async client of the OCI Distribution API v2 (the module store).

Written against the Distribution registry (``registry:2``; Debian's ``docker-registry``
2.8) and nothing beyond the spec it implements: no referrers API, no token auth.

Everything is content-addressed: an upload is checked against its sha256 before it is
committed, and every download is verified before it is handed back (a ranged read can't
be verified alone; :meth:`OciClient.iter_blob` and :meth:`OciClient.download_blob`
verify the assembled blob). Connection errors, 429 and 5xx answers are retried with
exponential back-off a bounded number of times, then raised as ``RegistryUnavailable``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from edgeloop.contracts.signing import check_digest as check_digest

MANIFEST_OCI = "application/vnd.oci.image.manifest.v1+json"
INDEX_OCI = "application/vnd.oci.image.index.v1+json"
MANIFEST_DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
LIST_DOCKER = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT_MANIFESTS = ", ".join((MANIFEST_OCI, INDEX_OCI, MANIFEST_DOCKER, LIST_DOCKER))
INDEX_TYPES = frozenset({INDEX_OCI, LIST_DOCKER})

# The Distribution spec's grammar: path components of lower-case alphanumerics joined by
# one separator, and at most 255 characters in all.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Registries commonly refuse manifests above 4 MiB; anything larger is not a manifest we
# wrote, so it is refused rather than held in memory.
MAX_MANIFEST_BYTES = 4 << 20
# Upload chunk: large enough that a 50 MB model is a handful of requests, small enough
# that a retried chunk costs little and memory stays flat.
CHUNK = 8 << 20
_RETRY_STATUS = frozenset({408, 429})


class OciError(Exception):
    """A registry answered something unexpected (the message says what and why)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RegistryUnavailable(OciError):
    """The registry is unreachable or failing (after the bounded retries)."""


class BlobNotFound(OciError):
    """No blob with that digest in the repository."""


class ManifestNotFound(OciError):
    """No manifest with that tag or digest in the repository."""


class DigestMismatch(OciError):
    """Bytes do not hash to the digest they were asked for (tampering or corruption)."""


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (what a manifest says about a blob or manifest)."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The descriptor's JSON form (annotations sorted, omitted when empty)."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Descriptor:
        """A descriptor from its JSON form.

        Raises:
            OciError: a field is missing or of the wrong type.
        """
        try:
            return cls(
                str(obj["mediaType"]),
                check_digest(str(obj["digest"])),
                int(obj["size"]),
                dict(obj["annotations"]) if obj.get("annotations") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise OciError(f"malformed descriptor {obj!r}: {exc}") from exc


def sha256(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> tuple[str, int]:
    """(``sha256:<hex>``, size) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _hash_partial(path: Path) -> tuple[hashlib._Hash, int]:
    """(running sha256, size) of what a broken download left in ``path``."""
    h = hashlib.sha256()
    size = 0
    if path.exists():
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
                size += len(block)
    return h, size


def check_repository(repo: str) -> str:
    """``repo`` if the Distribution spec allows it as a repository name.

    Raises:
        ValueError: upper case, empty components, a leading or trailing separator, or
            longer than 255 characters.
    """
    if len(repo) > 255 or not _REPO_RE.match(repo):
        raise ValueError(
            f"invalid OCI repository name {repo!r}: use lower-case path components "
            "[a-z0-9]+ joined by '.', '_', '__' or '-', separated by '/'"
        )
    return repo


def check_reference(ref: str) -> str:
    """``ref`` if it is a valid tag or a sha256 digest.

    Raises:
        ValueError: neither.
    """
    if _TAG_RE.match(ref) or _DIGEST_RE.match(ref):
        return ref
    raise ValueError(
        f"invalid reference {ref!r}: expected a tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}) "
        "or sha256:<64 hex digits>"
    )


def _with_digest(location: str, digest: str) -> str:
    """The upload URL with ``digest=`` added (it already carries the registry's state)."""
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def _registry_errors(resp: httpx.Response) -> str:
    """The registry's error codes and messages (its JSON error body), else the raw text."""
    try:
        errors = resp.json().get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (ValueError, AttributeError):
        text = ""
    return text or resp.text[:300]


class _Retryable(Exception):
    """A transient failure inside a retried operation."""


class OciClient:
    """Async client of one registry (``http://host:port``).

    Use it as an async context manager, or call :meth:`aclose`. ``retries`` bounds the
    retries of every request (so a call makes at most ``retries + 1`` attempts), waiting
    ``backoff``, then twice that, and so on between them.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30,
        retries: int = 4,
        backoff: float = 0.25,
        chunk_size: int = CHUNK,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Create a client.

        Args:
            base_url: ``http://host:port`` or ``https://host:port`` of the registry.
            timeout: Seconds for connecting and for each read or write.
            retries: Retries of a failed request (connection error, 408, 429, 5xx).
            backoff: Seconds before the first retry; doubled for each next one.
            chunk_size: Bytes per PATCH when a file is uploaded in chunks.
            transport: An httpx transport (tests inject faults with it).

        Raises:
            ValueError: ``base_url`` has no ``http://`` or ``https://`` scheme.
        """
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"OCI registry URL {base_url!r} needs a scheme: http://host:port or https://..."
            )
        self.base_url = base_url.rstrip("/")
        self.host = self.base_url.split("://", 1)[1]
        """``host:port``, as image references spell the registry."""
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)
        self._retries = retries
        self._backoff = backoff
        self._chunk = chunk_size

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> OciClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # --- plumbing ------------------------------------------------------------------

    def _delays(self) -> list[float]:
        return [self._backoff * 2**i for i in range(self._retries)]

    def _unavailable(self, what: str, attempts: int, error: str) -> RegistryUnavailable:
        return RegistryUnavailable(
            f"OCI registry {self.base_url} failed {what} after {attempts} attempts: {error}"
        )

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request, retried on connection errors, 408, 429 and 5xx."""
        delays = self._delays()
        for attempt in range(len(delays) + 1):
            try:
                resp = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 500 and resp.status_code not in _RETRY_STATUS:
                    return resp
                error = f"HTTP {resp.status_code}: {_registry_errors(resp)}"
            if attempt == len(delays):
                raise self._unavailable(f"{method} {url}", attempt + 1, error)
            await asyncio.sleep(delays[attempt])
        raise AssertionError("unreachable")

    @staticmethod
    def _expect(resp: httpx.Response, status: int | tuple[int, ...], what: str) -> None:
        wanted = (status,) if isinstance(status, int) else status
        if resp.status_code not in wanted:
            raise OciError(
                f"{what}: HTTP {resp.status_code}: {_registry_errors(resp)}",
                status=resp.status_code,
            )

    async def ping(self) -> bool:
        """Whether the registry answers ``GET /v2/`` with 200 (after the retries)."""
        try:
            return (await self._request("GET", "/v2/")).status_code == 200
        except RegistryUnavailable:
            return False

    # --- blobs ---------------------------------------------------------------------

    async def blob_exists(self, repo: str, digest: str) -> bool:
        """Whether ``repo`` holds the blob ``digest`` (HEAD).

        Raises:
            OciError: the registry answered neither 200 nor 404.
        """
        url = f"/v2/{check_repository(repo)}/blobs/{check_digest(digest)}"
        resp = await self._request("HEAD", url)
        if resp.status_code == 404:
            return False
        self._expect(resp, 200, f"HEAD blob {digest} in {repo}")
        return True

    async def push_blob(
        self,
        repo: str,
        data: bytes | Path,
        media_type: str = "application/octet-stream",
        *,
        digest: str | None = None,
    ) -> Descriptor:
        """Upload a blob unless ``repo`` has it already.

        Bytes and files up to one chunk go in one POST + PUT; a larger file is streamed
        from disk in PATCH chunks, so memory holds one chunk. A failed chunk resumes at
        the offset the registry reports or, where the registry refuses a session whose
        answer was lost (Distribution does), the upload starts over in a new session.

        Args:
            repo: Repository name.
            data: The bytes, or a file to stream.
            media_type: Media type recorded in the returned descriptor.
            digest: The digest the caller expects; checked before anything is sent.

        Returns:
            The blob's descriptor.

        Raises:
            DigestMismatch: ``data`` does not hash to ``digest``, or the registry
                computed another digest (the file changed while it was being sent).
        """
        check_repository(repo)
        if isinstance(data, Path):
            actual, size = await asyncio.to_thread(file_digest, data)
        else:
            actual, size = sha256(data), len(data)
        if digest is not None and check_digest(digest) != actual:
            raise DigestMismatch(f"blob for {repo} hashes to {actual}, not to {digest}")
        desc = Descriptor(media_type, actual, size)
        if await self.blob_exists(repo, actual):
            return desc
        location = await self._start_upload(repo)
        if isinstance(data, Path) and size > self._chunk:
            location = await self._patch_file(repo, location, data, size)
            await self._finish_upload(repo, location, actual, b"")
        elif isinstance(data, Path):
            body = await asyncio.to_thread(data.read_bytes)
            await self._finish_upload(repo, location, actual, body)
        else:
            await self._finish_upload(repo, location, actual, data)
        return desc

    async def _start_upload(self, repo: str) -> str:
        resp = await self._request("POST", f"/v2/{repo}/blobs/uploads/")
        self._expect(resp, 202, f"opening an upload session in {repo}")
        return str(resp.headers["Location"])

    async def _finish_upload(self, repo: str, location: str, digest: str, data: bytes) -> None:
        try:
            resp = await self._request(
                "PUT",
                _with_digest(location, digest),
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
        except RegistryUnavailable:
            # The PUT may have landed and only its answer been lost: then the blob is
            # there and the upload session is gone, which is success.
            if await self.blob_exists(repo, digest):
                return
            raise
        if resp.status_code == 400 and "DIGEST_INVALID" in resp.text:
            raise DigestMismatch(
                f"the registry computed another digest than {digest} for the upload to "
                f"{repo} (the source changed while it was sent?): {_registry_errors(resp)}"
            )
        if resp.status_code in (400, 404) and await self.blob_exists(repo, digest):
            return  # a retried PUT after one that landed: the session is gone, the blob not
        self._expect(resp, 201, f"committing blob {digest} in {repo}")

    async def _patch_file(self, repo: str, location: str, path: Path, size: int) -> str:
        """Send ``path`` in chunks; returns the upload location to commit."""
        delays = self._delays()
        failures = 0
        offset = 0
        with path.open("rb") as f:
            while offset < size:
                f.seek(offset)
                chunk = f.read(self._chunk)
                try:
                    resp = await self._http.patch(
                        location,
                        content=chunk,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                        },
                    )
                    if resp.status_code == 202:
                        location = resp.headers["Location"]
                        offset += len(chunk)
                        failures = 0
                        continue
                    # 416 / 404: the registry's offset or session state differs from
                    # ours (a chunk landed but its answer was lost); ask where to go on.
                    if resp.status_code not in (404, 416, *_RETRY_STATUS) and (
                        resp.status_code < 500
                    ):
                        self._expect(resp, 202, f"chunk {offset} of {path.name} to {repo}")
                    error = f"HTTP {resp.status_code}: {_registry_errors(resp)}"
                except httpx.TransportError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                if failures == len(delays):
                    raise self._unavailable(f"uploading {path.name} to {repo}", failures + 1, error)
                await asyncio.sleep(delays[failures])
                failures += 1
                location, offset = await self._upload_status(repo, location)
        return location

    async def _upload_status(self, repo: str, location: str) -> tuple[str, int]:
        """Where to go on after a failed chunk: (location, offset) to resume from.

        Asks the registry how much the session holds. Distribution signs the session
        state into each answer's Location, so once an answer is lost the session is
        refused (BLOB_UPLOAD_INVALID): then the upload starts over in a new session.
        """
        resp = await self._request("GET", location)
        if resp.status_code != 204:
            return await self._start_upload(repo), 0
        # "0-<last byte>", and "0-0" for both 0 and 1 bytes: the ambiguous case restarts
        # at 0 (a chunk is never a single byte here).
        _, _, last = resp.headers.get("Range", "0-0").partition("-")
        received = int(last) + 1 if last.isdigit() and int(last) > 0 else 0
        if received == 0:
            return await self._start_upload(repo), 0
        return resp.headers.get("Location", location), received

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> None:
        """Make a blob of ``from_repo`` available in ``repo`` without moving its bytes.

        When the registry refuses the cross-repository mount, the blob is copied through
        a temporary file (verified on the way).

        Raises:
            BlobNotFound: ``from_repo`` has no such blob.
        """
        resp = await self._request(
            "POST",
            f"/v2/{check_repository(repo)}/blobs/uploads/",
            params={"mount": check_digest(digest), "from": check_repository(from_repo)},
        )
        if resp.status_code == 201:
            return
        self._expect(resp, 202, f"mount of {digest} from {from_repo} into {repo}")
        # Refused (the blob is not in from_repo, or mounting is off): the 202 opened a
        # plain upload session we do not use; the registry purges idle sessions.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "blob"
            await self.download_blob(from_repo, digest, path)
            await self.push_blob(repo, path, digest=digest)

    async def get_blob(
        self, repo: str, digest: str, offset: int = 0, length: int | None = None
    ) -> bytes:
        """A blob's bytes, whole (verified against ``digest``) or a range of them.

        Args:
            repo: Repository name.
            digest: The blob's digest.
            offset: First byte to return (to resume an interrupted download).
            length: Bytes to return from ``offset``; ``None``: to the end.

        Returns:
            The bytes. A range can't be verified alone: the caller verifies the
            assembled blob (or uses :meth:`download_blob`, which does).

        Raises:
            BlobNotFound: no such blob in ``repo``.
            DigestMismatch: the whole blob does not hash to ``digest``.
            OciError: ``offset`` is at or beyond the blob's end (``status`` 416).
        """
        if offset < 0 or (length is not None and length <= 0):
            raise ValueError(f"invalid range: offset {offset}, length {length}")
        if offset or length is not None:
            end = None if length is None else offset + length - 1
            return b"".join([c async for c in self._stream(repo, digest, offset, end)])
        url = f"/v2/{check_repository(repo)}/blobs/{check_digest(digest)}"
        resp = await self._request("GET", url, follow_redirects=True)
        if resp.status_code == 404:
            raise BlobNotFound(f"blob {digest} not found in {repo}", status=404)
        self._expect(resp, 200, f"download of blob {digest} from {repo}")
        if sha256(resp.content) != digest:
            raise DigestMismatch(f"blob {digest} in {repo} hashes to {sha256(resp.content)}")
        return resp.content

    async def iter_blob(
        self, repo: str, digest: str, offset: int = 0, chunk: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """Stream a blob from ``offset`` in chunks of ``chunk`` bytes.

        A connection that breaks mid-stream is re-opened at the byte where it broke
        (bounded retries), so a consumer sees one uninterrupted stream. From offset 0
        the whole stream is verified: ``DigestMismatch`` is raised after the last chunk,
        so a consumer must not use the bytes before the iteration ends cleanly.

        Raises:
            BlobNotFound: no such blob in ``repo``.
            DigestMismatch: (offset 0 only) the bytes do not hash to ``digest``.
            OciError: ``offset`` is at or beyond the blob's end (``status`` 416).
            RegistryUnavailable: the stream could not be completed within the retries.
        """
        h = hashlib.sha256() if offset == 0 else None
        async for data in self._stream(repo, digest, offset, None, chunk):
            if h is not None:
                h.update(data)
            yield data
        if h is not None and "sha256:" + h.hexdigest() != digest:
            raise DigestMismatch(f"blob {digest} in {repo} hashes to sha256:{h.hexdigest()}")

    async def _stream(
        self, repo: str, digest: str, start: int, end: int | None, chunk: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """Bytes ``start``..``end`` (inclusive; ``None``: to the blob's end), resumed
        where a broken connection left off."""
        url = f"/v2/{check_repository(repo)}/blobs/{check_digest(digest)}"
        pos = start
        delays = self._delays()
        failures = 0
        while end is None or pos <= end:
            ranged = pos > 0 or end is not None
            headers = {"Range": f"bytes={pos}-{'' if end is None else end}"} if ranged else {}
            try:
                async with self._http.stream(
                    "GET", url, headers=headers, follow_redirects=True
                ) as resp:
                    if resp.status_code == 404:
                        raise BlobNotFound(f"blob {digest} not found in {repo}", status=404)
                    if resp.status_code == 416:
                        # Not read: Distribution 2.8 sends a 416 whose Content-Length is
                        # the blob's size but whose body is a short message.
                        size = resp.headers.get("Content-Range", "").rpartition("/")[2]
                        raise OciError(
                            f"byte {pos} is beyond the end of blob {digest} in {repo} "
                            f"(size {size or 'unknown'})",
                            status=416,
                        )
                    if resp.status_code >= 500 or resp.status_code in _RETRY_STATUS:
                        raise _Retryable(f"HTTP {resp.status_code}")
                    if resp.status_code not in (200, 206):
                        await resp.aread()
                        self._expect(resp, 206 if ranged else 200, f"download of {digest}")
                    # A server that ignores Range sends from byte 0: skip what we have.
                    skip = pos if resp.status_code == 200 else 0
                    async for data in resp.aiter_bytes(chunk):
                        if skip:
                            cut = min(skip, len(data))
                            data, skip = data[cut:], skip - cut
                        if end is not None:
                            data = data[: end + 1 - pos]
                        if not data:
                            continue
                        pos += len(data)
                        failures = 0  # progress: the retry budget is per stall
                        yield data
                        if end is not None and pos > end:
                            break
                return
            except (httpx.TransportError, _Retryable) as exc:
                if failures == len(delays):
                    raise self._unavailable(
                        f"download of {digest} from {repo} at byte {pos}",
                        failures + 1,
                        f"{type(exc).__name__}: {exc}",
                    ) from exc
                await asyncio.sleep(delays[failures])
                failures += 1

    async def download_blob(self, repo: str, digest: str, dest: Path) -> Descriptor:
        """Download a blob to ``dest``, resuming a partial ``dest`` left by a broken run.

        Returns:
            The blob's descriptor (media type ``application/octet-stream``).

        Raises:
            DigestMismatch: the assembled file does not hash to ``digest`` (the file is
                removed, so the next attempt starts from scratch).
        """
        h, have = await asyncio.to_thread(_hash_partial, dest)
        with dest.open("ab") as f:
            try:
                async for data in self.iter_blob(repo, digest, offset=have):
                    f.write(data)
                    h.update(data)
                    have += len(data)
            except DigestMismatch:
                pass  # iter_blob's own check (from offset 0): judged on the file below
            except OciError as exc:
                if exc.status != 416:  # 416: the partial file was complete already
                    raise
        if "sha256:" + h.hexdigest() != digest:
            await asyncio.to_thread(dest.unlink)
            raise DigestMismatch(f"blob {digest} from {repo} hashes to sha256:{h.hexdigest()}")
        return Descriptor("application/octet-stream", digest, have)

    async def delete_blob(self, repo: str, digest: str) -> None:
        """Delete a blob from ``repo`` (the registry must have deletes enabled).

        Raises:
            BlobNotFound: no such blob.
        """
        resp = await self._request(
            "DELETE", f"/v2/{check_repository(repo)}/blobs/{check_digest(digest)}"
        )
        if resp.status_code == 404:
            raise BlobNotFound(f"blob {digest} not found in {repo}", status=404)
        self._expect(resp, 202, f"delete of blob {digest} in {repo}")

    # --- manifests -----------------------------------------------------------------

    async def put_manifest(
        self, repo: str, ref: str, manifest: bytes, media_type: str = MANIFEST_OCI
    ) -> str:
        """Store a manifest under a tag or its own digest.

        Returns:
            The manifest's digest.

        Raises:
            DigestMismatch: ``ref`` is a digest other than the manifest's, or the
                registry stored it under another digest.
            OciError: the registry refused it (e.g. MANIFEST_BLOB_UNKNOWN: push the
                blobs first).
        """
        digest = sha256(manifest)
        if check_reference(ref).startswith("sha256:") and ref != digest:
            raise DigestMismatch(f"manifest hashes to {digest}; it can't be stored as {ref}")
        resp = await self._request(
            "PUT",
            f"/v2/{check_repository(repo)}/manifests/{ref}",
            content=manifest,
            headers={"Content-Type": media_type},
        )
        self._expect(resp, 201, f"put of manifest {ref} in {repo}")
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise DigestMismatch(f"registry stored manifest {ref} as {returned}, not {digest}")
        return digest

    async def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """A manifest by tag or digest, verified.

        Returns:
            (bytes, media type, digest).

        Raises:
            ManifestNotFound: no such tag or digest in ``repo``.
            DigestMismatch: the bytes do not hash to the digest asked for, or (for a
                tag) to the digest the registry says the tag points at.
        """
        resp = await self._request(
            "GET",
            f"/v2/{check_repository(repo)}/manifests/{check_reference(ref)}",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        if resp.status_code == 404:
            raise ManifestNotFound(f"manifest {ref} not found in {repo}", status=404)
        self._expect(resp, 200, f"get of manifest {ref} in {repo}")
        if len(resp.content) > MAX_MANIFEST_BYTES:
            raise OciError(f"manifest {ref} in {repo} is {len(resp.content)} bytes: too large")
        digest = sha256(resp.content)
        expected = ref if ref.startswith("sha256:") else resp.headers.get("Docker-Content-Digest")
        if expected and digest != expected:
            raise DigestMismatch(f"manifest {ref} in {repo} hashes to {digest}, not {expected}")
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if not media_type or media_type == "application/json":
            media_type = _declared_media_type(resp.content)
        return resp.content, media_type, digest

    async def resolve(self, repo: str, ref: str) -> Descriptor:
        """The descriptor (media type, digest, size) of a manifest, without its body.

        Raises:
            ManifestNotFound: no such tag or digest in ``repo``.
        """
        resp = await self._request(
            "HEAD",
            f"/v2/{check_repository(repo)}/manifests/{check_reference(ref)}",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        if resp.status_code == 404:
            raise ManifestNotFound(f"manifest {ref} not found in {repo}", status=404)
        self._expect(resp, 200, f"HEAD of manifest {ref} in {repo}")
        digest = resp.headers.get("Docker-Content-Digest")
        size = resp.headers.get("Content-Length")
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if not digest or size is None or not media_type:
            # No usable headers: fall back to the (verified) body.
            body, media_type, digest = await self.get_manifest(repo, ref)
            return Descriptor(media_type, digest, len(body))
        if ref.startswith("sha256:") and digest != ref:
            raise DigestMismatch(f"registry resolves {ref} in {repo} to {digest}")
        return Descriptor(media_type, check_digest(digest), int(size))

    async def tag(self, repo: str, tag: str, digest: str) -> None:
        """Point ``tag`` at the manifest ``digest`` (re-puts the manifest under it).

        Raises:
            ManifestNotFound: no manifest ``digest`` in ``repo``.
        """
        manifest, media_type, _ = await self.get_manifest(repo, check_digest(digest))
        await self.put_manifest(repo, tag, manifest, media_type)

    async def list_tags(self, repo: str) -> list[str]:
        """Tags of a repository, following pagination ([] when it has none)."""
        url: str | None = f"/v2/{check_repository(repo)}/tags/list"
        tags: list[str] = []
        while url:
            resp = await self._request("GET", url)
            if resp.status_code == 404:
                return tags
            self._expect(resp, 200, f"tags of {repo}")
            tags.extend(resp.json().get("tags") or [])
            url = _next_link(resp.headers.get("Link"))
        return tags

    async def delete_manifest(self, repo: str, digest: str) -> None:
        """Delete the manifest ``digest`` (and so every tag pointing at it).

        Distribution deletes by digest only; resolve a tag first if that is what is
        meant. The registry must run with ``storage.delete.enabled: true``.

        Raises:
            ManifestNotFound: no manifest ``digest`` in ``repo``.
            OciError: deletes are disabled in the registry (HTTP 405).
        """
        resp = await self._request(
            "DELETE", f"/v2/{check_repository(repo)}/manifests/{check_digest(digest)}"
        )
        if resp.status_code == 404:
            raise ManifestNotFound(f"manifest {digest} not found in {repo}", status=404)
        if resp.status_code == 405:
            raise OciError(
                f"the registry refuses deletes ({_registry_errors(resp)}): "
                "enable storage.delete in its configuration",
                status=405,
            )
        self._expect(resp, 202, f"delete of manifest {digest} in {repo}")


def _declared_media_type(manifest: bytes) -> str:
    """The ``mediaType`` a manifest declares in its body (OCI manifest if none)."""
    try:
        declared = json.loads(manifest).get("mediaType")
    except (ValueError, AttributeError):
        declared = None
    return str(declared) if declared else MANIFEST_OCI


def _next_link(link: str | None) -> str | None:
    """The URL of a ``Link: <url>; rel="next"`` header (tag list pagination)."""
    if not link or 'rel="next"' not in link:
        return None
    start, end = link.find("<"), link.find(">")
    return link[start + 1 : end] if 0 <= start < end else None
