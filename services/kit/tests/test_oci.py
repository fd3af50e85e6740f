"""The module store against a real Distribution registry (Debian's docker-registry)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeloop.devstack.servers import OciRegistry, free_port
from edgeloop.kit.oci import DigestMismatch, OciClient, RegistryUnavailable, sha256
from edgeloop.kit.oci.image import (
    BaseImage,
    build_model_image,
    push_image,
    read_layer_file,
    reproducible_layer,
)
from edgeloop.kit.oci.signing import (
    Signature,
    SignatureError,
    attach_signature,
    fetch_signature,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_image,
    verify_signature,
)

FILES = {"model/model.onnx": b"\x08\x07onnx-bytes" * 100, "model/model.json": b'{"kind":"x"}'}
ANN = {"edgeloop.model": "iris", "edgeloop.version": "3"}


async def test_blob_push_exists_and_ranged_get(registry_url: str, unique: str) -> None:
    repo = f"t/{unique}"
    data = os.urandom(100_000)
    async with OciClient(registry_url) as oci:
        desc = await oci.push_blob(repo, data)
        assert desc.digest == sha256(data)
        assert await oci.blob_exists(repo, desc.digest)
        assert await oci.get_blob(repo, desc.digest) == data
        # A download that broke at 40,000 bytes resumes from there.
        assert await oci.get_blob(repo, desc.digest, offset=40_000) == data[40_000:]
        streamed = b"".join([c async for c in oci.iter_blob(repo, desc.digest, offset=99_000)])
        assert streamed == data[99_000:]
        again = await oci.push_blob(repo, data)  # already there: no second upload
        assert again == desc


async def test_large_file_is_uploaded_in_chunks(
    registry_url: str, unique: str, tmp_path: Path
) -> None:
    path = tmp_path / "big.onnx"
    path.write_bytes(os.urandom(30 << 20))
    async with OciClient(registry_url) as oci:
        desc = await oci.push_blob(f"t/{unique}", path)
        assert desc.size == 30 << 20
        assert await oci.get_blob(f"t/{unique}", desc.digest) == path.read_bytes()


async def test_tampered_blob_is_detected(tmp_path: Path, unique: str) -> None:
    reg = OciRegistry(tmp_path / "reg").start()
    try:
        async with OciClient(reg.url) as oci:
            desc = await oci.push_blob(f"t/{unique}", b"genuine model bytes")
            hexd = desc.digest.removeprefix("sha256:")
            blob = next(
                (tmp_path / "reg" / "storage").rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data")
            )
            blob.write_bytes(b"evil model bytes!!!")
            with pytest.raises(DigestMismatch, match="hashes to"):
                await oci.get_blob(f"t/{unique}", desc.digest)
    finally:
        reg.stop()


def test_layers_are_reproducible() -> None:
    a = build_model_image(FILES, annotations=ANN)
    b = build_model_image(dict(reversed(list(FILES.items()))), annotations=dict(ANN))
    assert a.digest == b.digest
    assert a.layer == b.layer
    changed = build_model_image({**FILES, "model/model.json": b'{"kind":"y"}'}, annotations=ANN)
    assert changed.digest != a.digest
    assert reproducible_layer(FILES)[1] == reproducible_layer(FILES)[1]


async def test_image_push_read_and_skopeo(registry_url: str, unique: str) -> None:
    repo = f"edgeloop/images/{unique}"
    async with OciClient(registry_url) as oci:
        # A runtime base image in the same registry; the model image reuses its layer.
        base_img = build_model_image(
            {"runtime/serve.py": b"print('serve')"},
            annotations={},
            env={"PYTHONUNBUFFERED": "1"},
            cmd=["python", "serve.py"],
        )
        await push_image(oci, f"edgeloop/base/{unique}", base_img, tag="1")
        base = await BaseImage.from_registry(oci, f"edgeloop/base/{unique}", "1")
        image = build_model_image(
            FILES, annotations=ANN, labels={"edgeloop.model": "iris"}, base=base
        )
        digest = await push_image(oci, repo, image, tag="3")
        assert digest == image.digest
        assert await read_layer_file(oci, repo, digest, "model/model.json") == b'{"kind":"x"}'
        assert await read_layer_file(oci, repo, digest, "runtime/serve.py") == b"print('serve')"
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    host = registry_url.removeprefix("http://")
    out = subprocess.run(  # noqa: ASYNC221 (a short CLI call in a test)
        [skopeo, "inspect", "--tls-verify=false", f"docker://{host}/{repo}:3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    info = json.loads(out.stdout)
    assert info["Digest"] == digest
    assert info["Labels"]["edgeloop.model"] == "iris"
    assert len(info["Layers"]) == 2
    raw = subprocess.run(  # noqa: ASYNC221
        [skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{host}/{repo}:3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(raw.stdout)["annotations"] == ANN


async def test_signatures(registry_url: str, unique: str) -> None:
    private_pem, public_pem = generate_keypair()
    key, pub = load_private_key(private_pem), load_public_key(public_pem)
    other_pub = load_public_key(generate_keypair()[1])
    repo = f"edgeloop/images/{unique}"
    async with OciClient(registry_url) as oci:
        image = build_model_image(FILES, annotations=ANN)
        digest = await push_image(oci, repo, image, tag="1")
        with pytest.raises(SignatureError, match="not signed"):
            await verify_image(oci, repo, digest, pub)
        sig = sign_manifest(key, repo, digest)
        await attach_signature(oci, repo, digest, len(image.manifest), sig)
        claims = await verify_image(oci, repo, digest, pub)
        assert claims["critical"]["image"]["docker-manifest-digest"] == digest
        with pytest.raises(SignatureError, match="wrong key or tampered"):
            await verify_image(oci, repo, digest, other_pub)
        stored = await fetch_signature(oci, repo, digest)
    tampered = Signature(stored.payload.replace(b"edgeloop", b"evilloop"), stored.signature)
    with pytest.raises(SignatureError, match="tampered"):
        verify_signature(pub, tampered, digest)
    with pytest.raises(SignatureError, match="is for"):
        verify_signature(pub, stored, "sha256:" + "0" * 64)


async def test_registry_down_is_reported_after_bounded_retries() -> None:
    async with OciClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as oci:
        with pytest.raises(RegistryUnavailable, match="after 3 attempts"):
            await oci.push_blob("t/x", b"data")
        assert not await oci.ping()
