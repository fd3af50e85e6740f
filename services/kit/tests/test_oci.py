"""The module store against a real Distribution registry (Debian's docker-registry).

``registry_url`` and ``oci_registry`` are the session's registry from the devstack pytest
plugin. Faults the registry can't be asked for (a lost answer, a connection cut
mid-stream, 503s) are injected with an httpx transport in front of the real one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeloop.devstack.servers import OciRegistry, free_port
from edgeloop.kit.oci import (
    BlobNotFound,
    DigestMismatch,
    ManifestNotFound,
    OciClient,
    OciError,
    RegistryUnavailable,
    sha256,
)
from edgeloop.kit.oci.client import INDEX_OCI, MANIFEST_OCI, check_repository
from edgeloop.kit.oci.image import (
    BaseImage,
    build_model_image,
    pull_file,
    push_image,
    read_layer_file,
    reproducible_layer,
)
from edgeloop.kit.oci.signing import (
    SIGNATURE_ARTIFACT,
    SignatureError,
    attach_signature,
    fetch_and_verify_signature,
    fetch_signatures,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
    signature_tag,
    verify_image,
    verify_manifest_signature,
)

ONNX = b"\x08\x07onnx-bytes" * 100
FILES: dict[str, bytes | Path] = {
    "model/model.onnx": ONNX,
    "model/model.json": b'{"kind":"x"}',
}
ANN = {
    "org.opencontainers.image.title": "iris",
    "edgeloop.model": "iris",
    "edgeloop.version": "3",
    "edgeloop.source_commit": "abc123",
    "edgeloop.data_digest": "sha256:" + "1" * 64,
}

Hook = Callable[[httpx.Request, httpx.AsyncBaseTransport], Awaitable[httpx.Response]]


class Faulty(httpx.AsyncBaseTransport):
    """The real transport, with ``hook`` deciding what each request gets."""

    def __init__(self, hook: Hook) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.hook = hook
        self.requests: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        return await self.hook(request, self.inner)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def passthrough(request: httpx.Request, inner: httpx.AsyncBaseTransport) -> httpx.Response:
    return await inner.handle_async_request(request)


class CutStream(httpx.AsyncByteStream):
    """A response body that breaks after ``after`` bytes, like a dropped link."""

    def __init__(self, inner: httpx.AsyncByteStream, after: int) -> None:
        self.inner, self.after = inner, after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        async for data in self.inner:
            if sent + len(data) > self.after:
                yield data[: self.after - sent]
                raise httpx.ReadError("connection reset by peer")
            sent += len(data)
            yield data

    async def aclose(self) -> None:
        await self.inner.aclose()


def blob_file(registry: OciRegistry, digest: str) -> Path:
    """Where the registry keeps a blob (manifests are blobs too) on its disk."""
    hexd = digest.removeprefix("sha256:")
    return next(registry.data_dir.rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data"))


# --- blobs -------------------------------------------------------------------------


async def test_blob_push_exists_and_ranged_get(
    registry_url: str, unique: str, tmp_path: Path
) -> None:
    repo = f"t/{unique}"
    data = os.urandom(100_000)
    async with OciClient(registry_url) as oci:
        assert not await oci.blob_exists(repo, sha256(data))
        desc = await oci.push_blob(repo, data, digest=sha256(data))
        assert desc.digest == sha256(data)
        assert desc.size == len(data)
        assert await oci.blob_exists(repo, desc.digest)
        assert await oci.get_blob(repo, desc.digest) == data
        # A download that broke at 40,000 bytes resumes from there.
        assert await oci.get_blob(repo, desc.digest, offset=40_000) == data[40_000:]
        assert await oci.get_blob(repo, desc.digest, offset=10, length=5) == data[10:15]
        with pytest.raises(OciError, match="beyond the end") as past_end:
            await oci.get_blob(repo, desc.digest, offset=len(data))
        assert past_end.value.status == 416
        streamed = b"".join([c async for c in oci.iter_blob(repo, desc.digest, offset=99_000)])
        assert streamed == data[99_000:]
        # download_blob resumes a partial file and verifies the whole.
        dest = tmp_path / "partial"
        dest.write_bytes(data[:12_345])
        assert (await oci.download_blob(repo, desc.digest, dest)).size == len(data)
        assert dest.read_bytes() == data
        await oci.download_blob(repo, desc.digest, dest)  # complete already: nothing to do
        assert dest.read_bytes() == data
        again = await oci.push_blob(repo, data)  # already there: no second upload
        assert again == desc
        with pytest.raises(DigestMismatch, match="hashes to"):
            await oci.push_blob(repo, b"other bytes", digest=desc.digest)
        with pytest.raises(BlobNotFound):
            await oci.get_blob(repo, sha256(b"never pushed"))
        with pytest.raises(ValueError, match="invalid OCI repository name"):
            await oci.push_blob("Upper/Case", data)
    for bad in ("", "a//b", "-a", "a-", "a/", "a..b", "A"):
        with pytest.raises(ValueError, match="invalid OCI repository name"):
            check_repository(bad)
    for good in ("a", "edgeloop/images/iris-v2", "a__b", "a--b/c.d_e"):
        assert check_repository(good) == good


async def test_large_file_is_streamed_in_chunks(
    registry_url: str, unique: str, tmp_path: Path
) -> None:
    path = tmp_path / "big.onnx"
    path.write_bytes(os.urandom(30 << 20))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    faulty = Faulty(passthrough)
    async with OciClient(registry_url, transport=faulty) as oci:
        desc = await oci.push_blob(f"t/{unique}", path)
        assert desc.size == 30 << 20
        assert desc.digest == f"sha256:{expected}"
        h = hashlib.sha256()
        async for chunk in oci.iter_blob(f"t/{unique}", desc.digest):
            h.update(chunk)
        assert h.hexdigest() == expected
    patches = [r for r in faulty.requests if r[0] == "PATCH"]
    assert len(patches) == 4  # 8 MiB chunks: the file never was one request body


async def test_a_chunk_whose_answer_was_lost_resumes(
    registry_url: str, unique: str, tmp_path: Path
) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(os.urandom(5 << 20))
    patches = 0

    async def lose_second_patch_answer(
        request: httpx.Request, inner: httpx.AsyncBaseTransport
    ) -> httpx.Response:
        nonlocal patches
        resp = await inner.handle_async_request(request)
        if request.method == "PATCH":
            patches += 1
            if patches == 2:  # the registry took the chunk; its answer is lost
                await resp.aclose()
                raise httpx.ReadError("connection reset by peer", request=request)
        return resp

    faulty = Faulty(lose_second_patch_answer)
    async with OciClient(registry_url, chunk_size=1 << 20, backoff=0.01, transport=faulty) as oci:
        desc = await oci.push_blob(f"t/{unique}", path)
        assert await oci.get_blob(f"t/{unique}", desc.digest) == path.read_bytes()
    # Distribution refuses a session whose last answer was lost (its state is signed
    # into each Location), so the upload started over in a second session.
    assert [m for m, _ in faulty.requests].count("POST") == 2
    assert patches == 2 + 5


async def test_a_lost_commit_answer_is_not_an_error(registry_url: str, unique: str) -> None:
    lost = 0

    async def lose_put_answer(
        request: httpx.Request, inner: httpx.AsyncBaseTransport
    ) -> httpx.Response:
        nonlocal lost
        resp = await inner.handle_async_request(request)
        if request.method == "PUT" and "/blobs/uploads/" in request.url.path and not lost:
            lost += 1  # the blob was committed; the client never hears it
            await resp.aclose()
            raise httpx.ReadError("connection reset by peer", request=request)
        return resp

    async with OciClient(registry_url, backoff=0.01, transport=Faulty(lose_put_answer)) as oci:
        desc = await oci.push_blob(f"t/{unique}", b"committed once")
        assert await oci.get_blob(f"t/{unique}", desc.digest) == b"committed once"
    assert lost == 1


async def test_a_stream_cut_mid_way_resumes_and_is_verified(registry_url: str, unique: str) -> None:
    data = os.urandom(3 << 20)
    cuts = 0

    async def cut_first_download(
        request: httpx.Request, inner: httpx.AsyncBaseTransport
    ) -> httpx.Response:
        nonlocal cuts
        resp = await inner.handle_async_request(request)
        if request.method == "GET" and "/blobs/sha256:" in request.url.path and cuts == 0:
            cuts += 1
            assert isinstance(resp.stream, httpx.AsyncByteStream)
            return httpx.Response(
                resp.status_code,
                headers=resp.headers,
                stream=CutStream(resp.stream, 1_000_000),
                request=request,
            )
        return resp

    async with OciClient(registry_url, backoff=0.01, transport=Faulty(cut_first_download)) as oci:
        desc = await oci.push_blob(f"t/{unique}", data)
        got = b"".join([c async for c in oci.iter_blob(f"t/{unique}", desc.digest)])
    assert cuts == 1
    assert got == data


async def test_tampered_blob_and_manifest_are_detected(
    registry_url: str, oci_registry: OciRegistry, unique: str, tmp_path: Path
) -> None:
    repo = f"t/{unique}"
    async with OciClient(registry_url) as oci:
        desc = await oci.push_blob(repo, f"genuine model bytes {unique}".encode())
        blob_file(oci_registry, desc.digest).write_bytes(b"evil model bytes!!!")
        with pytest.raises(DigestMismatch, match="hashes to"):
            await oci.get_blob(repo, desc.digest)
        with pytest.raises(DigestMismatch):
            _ = [c async for c in oci.iter_blob(repo, desc.digest)]
        dest = tmp_path / "dl"
        with pytest.raises(DigestMismatch):
            await oci.download_blob(repo, desc.digest, dest)
        assert not dest.exists()  # the next attempt starts clean

        image = build_model_image(FILES, annotations={**ANN, "edgeloop.version": unique})
        digest = await push_image(oci, repo, image, tag="v1")
        evil = image.manifest.replace(b'"iris"', b'"evil"')
        blob_file(oci_registry, digest).write_bytes(evil)
        with pytest.raises(DigestMismatch):
            await oci.get_manifest(repo, digest)
        with pytest.raises(DigestMismatch):
            await oci.get_manifest(repo, "v1")  # by tag: against the tag's digest
        with pytest.raises(DigestMismatch):
            await pull_file(oci, repo, "v1", "model/model.json")


async def test_5xx_is_retried_then_succeeds(registry_url: str, unique: str) -> None:
    failures = 0

    async def two_503s(request: httpx.Request, inner: httpx.AsyncBaseTransport) -> httpx.Response:
        nonlocal failures
        if failures < 2:
            failures += 1
            return httpx.Response(503, text="busy", request=request)
        return await inner.handle_async_request(request)

    async with OciClient(registry_url, backoff=0.01, transport=Faulty(two_503s)) as oci:
        desc = await oci.push_blob(f"t/{unique}", b"data")
    assert failures == 2
    assert desc.digest == sha256(b"data")


async def test_registry_down_is_reported_after_bounded_retries() -> None:
    started = time.monotonic()
    async with OciClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as oci:
        with pytest.raises(RegistryUnavailable, match="after 3 attempts"):
            await oci.push_blob("t/x", b"data")
        with pytest.raises(RegistryUnavailable):
            _ = [c async for c in oci.iter_blob("t/x", sha256(b"data"))]
        assert not await oci.ping()
    assert time.monotonic() - started < 5


# --- manifests ---------------------------------------------------------------------


async def test_manifests_tags_and_delete(registry_url: str, unique: str) -> None:
    repo = f"t/{unique}"
    image = build_model_image(FILES, annotations=ANN)
    async with OciClient(registry_url) as oci:
        assert await oci.ping()
        assert await oci.list_tags(repo) == []
        digest = await push_image(oci, repo, image)  # by digest only
        assert digest == image.digest
        await oci.tag(repo, "1.0", digest)
        await oci.tag(repo, "latest", digest)
        assert sorted(await oci.list_tags(repo)) == ["1.0", "latest"]
        body, media_type, got = await oci.get_manifest(repo, "1.0")
        assert (body, media_type, got) == (image.manifest, MANIFEST_OCI, digest)
        resolved = await oci.resolve(repo, "latest")
        assert (resolved.digest, resolved.size) == (digest, len(image.manifest))
        with pytest.raises(DigestMismatch):
            await oci.put_manifest(repo, "sha256:" + "0" * 64, image.manifest)
        with pytest.raises(ValueError, match="invalid reference"):
            await oci.get_manifest(repo, "bad tag!")
        await oci.delete_manifest(repo, digest)
        with pytest.raises(ManifestNotFound):
            await oci.get_manifest(repo, digest)
        with pytest.raises(ManifestNotFound):
            await oci.delete_manifest(repo, digest)


# --- images ------------------------------------------------------------------------


def test_builds_are_reproducible(tmp_path: Path) -> None:
    a = build_model_image(FILES, annotations=ANN, labels={"x": "1"})
    b = build_model_image(
        dict(reversed(list(FILES.items()))), annotations=dict(ANN), labels={"x": "1"}
    )
    assert (a.digest, a.layer, a.config) == (b.digest, b.layer, b.config)
    # A file given as a path gives the same layer as its bytes.
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(ONNX)
    c = build_model_image({**FILES, "model/model.onnx": onnx}, annotations=ANN, labels={"x": "1"})
    assert c.digest == a.digest
    # One changed byte, annotation or timestamp: another image.
    changed = build_model_image({**FILES, "model/model.json": b'{"kind":"y"}'}, annotations=ANN)
    assert changed.digest != build_model_image(FILES, annotations=ANN).digest
    assert build_model_image(FILES, annotations={**ANN, "edgeloop.version": "4"}).digest != (
        build_model_image(FILES, annotations=ANN).digest
    )
    assert build_model_image(FILES, annotations=ANN, created=1).digest != (
        build_model_image(FILES, annotations=ANN).digest
    )
    layer, diff_id = reproducible_layer(FILES)
    assert (layer, diff_id) == reproducible_layer(FILES)
    assert layer[4:8] == b"\0\0\0\0"  # gzip mtime 0
    config = json.loads(a.config)
    assert config["rootfs"]["diff_ids"] == [diff_id]
    assert config["created"] == "1970-01-01T00:00:00Z"
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    with pytest.raises(ValueError, match="invalid path"):
        build_model_image({"../etc/passwd": b""}, annotations={})


async def test_image_on_a_base_push_pull_and_skopeo(registry_url: str, unique: str) -> None:
    repo, base_repo = f"edgeloop/images/{unique}", f"edgeloop/base/{unique}"
    async with OciClient(registry_url) as oci:
        # A runtime base image in the same registry, published as a multi-platform index.
        base_img = build_model_image(
            {"runtime/serve.py": b"print('serve')", "runtime/old.txt": b"old"},
            annotations={},
            env={"PYTHONUNBUFFERED": "1", "EDGELOOP_MODEL_PATH": "/x"},
            cmd=["python", "serve.py"],
        )
        await push_image(oci, base_repo, base_img)
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": INDEX_OCI,
                "manifests": [
                    {
                        **base_img.descriptor.as_dict(),
                        "platform": {"os": "linux", "architecture": "amd64"},
                    }
                ],
            }
        ).encode()
        await oci.put_manifest(base_repo, "py311", index, INDEX_OCI)
        base = await BaseImage.from_registry(oci, base_repo, "py311")
        assert base.digest == base_img.digest
        image = build_model_image(
            {**FILES, "runtime/.wh.old.txt": b""},
            annotations=ANN,
            labels={"edgeloop.model": "iris"},
            base=base,
            env={"EDGELOOP_MODEL_PATH": "/model/model.onnx"},
        )
        config = json.loads(image.config)
        assert config["config"]["Cmd"] == ["python", "serve.py"]
        assert config["config"]["Env"] == [
            "PYTHONUNBUFFERED=1",
            "EDGELOOP_MODEL_PATH=/model/model.onnx",
        ]
        digest = await push_image(oci, repo, image, tag="3")
        assert digest == image.digest
        assert await oci.blob_exists(repo, base.layers[0].digest)  # mounted, not rebuilt
        assert await pull_file(oci, repo, digest, "model/model.json") == b'{"kind":"x"}'
        assert await pull_file(oci, repo, "3", "/runtime/serve.py") == b"print('serve')"
        assert await read_layer_file(oci, repo, "3", "model/model.onnx") == ONNX
        with pytest.raises(FileNotFoundError):  # deleted by the model layer's whiteout
            await pull_file(oci, repo, digest, "runtime/old.txt")
        with pytest.raises(FileNotFoundError):
            await pull_file(oci, repo, digest, "model/missing.onnx")
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    host = registry_url.removeprefix("http://")

    def inspect(*args: str) -> dict[str, Any]:
        out = subprocess.run(
            [skopeo, "inspect", "--tls-verify=false", *args, f"docker://{host}/{repo}:3"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return dict(json.loads(out.stdout))

    info = inspect()
    assert info["Digest"] == digest
    assert info["Labels"] == {"edgeloop.model": "iris"}
    assert info["Architecture"] == "amd64"
    assert len(info["Layers"]) == 2
    raw = inspect("--raw")
    assert raw["annotations"] == {
        **ANN,
        "org.opencontainers.image.base.name": base_repo,
        "org.opencontainers.image.base.digest": base_img.digest,
    }


# --- signatures --------------------------------------------------------------------


async def test_sign_and_verify(registry_url: str, unique: str, tmp_path: Path) -> None:
    private_pem, public_pem = generate_keypair()
    (tmp_path / "key.pem").write_bytes(private_pem)
    key = load_private_key(tmp_path / "key.pem")
    pub = load_public_key(public_pem.decode())
    other_key = load_private_key(generate_keypair()[0])
    repo = f"edgeloop/images/{unique}"
    async with OciClient(registry_url) as oci:
        image = build_model_image(FILES, annotations=ANN)
        digest = await push_image(oci, repo, image, tag="1")
        with pytest.raises(SignatureError, match="not signed"):
            await fetch_and_verify_signature(oci, repo, digest, pub)

        sig_digest = await attach_signature(oci, repo, digest, key, annotations={"v": "1"})
        claims = await fetch_and_verify_signature(oci, repo, digest, pub)
        assert claims["critical"]["image"]["docker-manifest-digest"] == digest
        assert claims["critical"]["identity"]["docker-reference"] == repo
        assert claims["optional"]["v"] == "1"
        # Stored in the referrers tag schema, next to the image.
        raw, _, got = await oci.get_manifest(repo, signature_tag(digest))
        assert got == sig_digest
        manifest = json.loads(raw)
        assert manifest["artifactType"] == SIGNATURE_ARTIFACT
        assert manifest["subject"] == image.descriptor.as_dict()
        assert signature_tag(digest) in await oci.list_tags(repo)
        # Signing again is idempotent (Ed25519 is deterministic).
        assert await attach_signature(oci, repo, digest, key, annotations={"v": "1"}) == sig_digest

        with pytest.raises(SignatureError, match="wrong key"):
            await fetch_and_verify_signature(oci, repo, digest, other_key.public_key())
        # A second signer (key rotation) is added, not swapped in: both verify.
        await attach_signature(oci, repo, digest, other_key)
        assert len(await fetch_signatures(oci, repo, digest)) == 2
        await verify_image(oci, repo, digest, pub)
        await fetch_and_verify_signature(oci, repo, digest, other_key.public_key())

        # The form the builder calls: a signature made before, with the subject's size.
        other = build_model_image(FILES, annotations={**ANN, "edgeloop.version": "4"})
        other_digest = await push_image(oci, repo, other)
        sig = sign_manifest(key, repo, other_digest)
        await attach_signature(oci, repo, other_digest, len(other.manifest), sig, MANIFEST_OCI)
        await fetch_and_verify_signature(oci, repo, other_digest, pub)
        # A signature is bound to its digest: image 3's signature does not vouch for 4.
        stored = (await fetch_signatures(oci, repo, digest))[0]
        with pytest.raises(SignatureError, match="digest mismatch"):
            verify_manifest_signature(pub, stored.payload, stored.signature, other_digest)
        with pytest.raises(SignatureError, match="not of"):
            verify_manifest_signature(
                pub, stored.payload, stored.signature_b64, digest, repo="another/repo"
            )

    tampered = stored.payload.replace(b'"v":"1"', b'"v":"2"')
    with pytest.raises(SignatureError, match="bad signature"):
        verify_manifest_signature(pub, tampered, stored.signature, digest)
    flipped = bytes([stored.signature[0] ^ 1]) + stored.signature[1:]
    with pytest.raises(SignatureError, match="bad signature"):
        verify_manifest_signature(pub, stored.payload, flipped, digest)
    with pytest.raises(SignatureError, match="base64"):
        verify_manifest_signature(pub, stored.payload, "not base64!", digest)
    assert key_id(key) == key_id(pub) != key_id(other_key)
    with pytest.raises(SignatureError, match=r"not Ed25519|not a PEM"):
        load_public_key(private_pem)


async def test_a_forged_signature_in_the_registry_is_refused(
    registry_url: str, unique: str
) -> None:
    """Someone with push rights but not the key replaces the signature manifest."""
    key = load_private_key(generate_keypair()[0])
    pub = load_public_key(generate_keypair()[1])  # the trusted key: not the forger's
    repo = f"edgeloop/images/{unique}"
    async with OciClient(registry_url) as oci:
        image = build_model_image(FILES, annotations=ANN)
        digest = await push_image(oci, repo, image)
        await attach_signature(oci, repo, digest, key)
        with pytest.raises(SignatureError, match="wrong key"):
            await verify_image(oci, repo, digest, pub)
