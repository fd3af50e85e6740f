"""Ed25519 signatures of image manifests, stored next to the image.

The payload follows cosign's "simple signing" shape (the identity and the manifest digest
it vouches for). Debian's Distribution registry 2.8 has no OCI 1.1 referrers API, so the
signature is stored with the referrers *tag schema* OCI 1.1 defines as the fallback: an
artifact manifest whose ``subject`` is the signed manifest, tagged ``sha256-<hex>.sig``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeloop.kit.oci.client import MANIFEST_OCI, Descriptor, ManifestNotFound, OciClient, sha256

SIGNATURE_ARTIFACT = "application/vnd.edgeloop.signature.v1+json"
PAYLOAD_MEDIA = "application/vnd.edgeloop.signature.payload.v1+json"
EMPTY_MEDIA = "application/vnd.oci.empty.v1+json"
SIGNATURE_ANNOTATION = "dev.edgeloop.signature"
SIGNATURE_TYPE = "edgeloop container signature v1"


class SignatureError(Exception):
    """A signature is missing, malformed, for another image, or not by the trusted key."""


def generate_keypair() -> tuple[bytes, bytes]:
    """(private PEM, public PEM) of a new Ed25519 key."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def _pem(source: bytes | str | Path) -> bytes:
    if isinstance(source, Path):
        return source.read_bytes()
    if isinstance(source, str):
        return source.encode()
    return source


def load_private_key(source: bytes | str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (bytes, text or a file)."""
    key = serialization.load_pem_private_key(_pem(source), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("the signing key is not an Ed25519 private key")
    return key


def load_public_key(source: bytes | str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (bytes, text or a file)."""
    key = serialization.load_pem_public_key(_pem(source))
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("the verification key is not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class Signature:
    """A signed payload: what was signed and the signature over it."""

    payload: bytes
    signature: bytes

    def claims(self) -> dict[str, Any]:
        """The payload, parsed."""
        return dict(json.loads(self.payload))


def sign_manifest(
    key: Ed25519PrivateKey,
    repository: str,
    manifest_digest: str,
    annotations: dict[str, str] | None = None,
) -> Signature:
    """Sign ``manifest_digest`` of ``repository``."""
    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": repository},
                "image": {"docker-manifest-digest": manifest_digest},
                "type": SIGNATURE_TYPE,
            },
            "optional": dict(sorted((annotations or {}).items())),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return Signature(payload, key.sign(payload))


def verify_signature(key: Ed25519PublicKey, sig: Signature, expected_digest: str) -> dict[str, Any]:
    """Check the signature and that it vouches for ``expected_digest``; its claims."""
    try:
        key.verify(sig.signature, sig.payload)
    except InvalidSignature as exc:
        raise SignatureError(
            "signature does not verify with the trusted key (wrong key or tampered payload)"
        ) from exc
    try:
        claims = sig.claims()
        signed = claims["critical"]["image"]["docker-manifest-digest"]
        kind = claims["critical"]["type"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"signature payload is malformed: {exc}") from exc
    if kind != SIGNATURE_TYPE:
        raise SignatureError(f"signature payload has type {kind!r}, not {SIGNATURE_TYPE!r}")
    if signed != expected_digest:
        raise SignatureError(f"signature is for {signed}, not for {expected_digest}")
    return claims


def signature_tag(manifest_digest: str) -> str:
    """The referrers tag-schema tag of a manifest's signature."""
    return manifest_digest.replace(":", "-") + ".sig"


async def attach_signature(
    client: OciClient,
    repo: str,
    manifest_digest: str,
    manifest_size: int,
    sig: Signature,
    media_type: str = MANIFEST_OCI,
) -> str:
    """Store ``sig`` next to the image; returns the signature manifest's digest."""
    empty = await client.push_blob(repo, b"{}", EMPTY_MEDIA)
    payload = await client.push_blob(repo, sig.payload, PAYLOAD_MEDIA)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_OCI,
        "artifactType": SIGNATURE_ARTIFACT,
        "config": empty.as_dict(),
        "layers": [
            Descriptor(
                PAYLOAD_MEDIA,
                payload.digest,
                payload.size,
                {SIGNATURE_ANNOTATION: base64.b64encode(sig.signature).decode()},
            ).as_dict()
        ],
        "subject": Descriptor(media_type, manifest_digest, manifest_size).as_dict(),
    }
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return await client.put_manifest(repo, signature_tag(manifest_digest), body)


async def fetch_signature(client: OciClient, repo: str, manifest_digest: str) -> Signature:
    """The stored signature of ``manifest_digest`` (not yet verified)."""
    try:
        raw, _, _ = await client.get_manifest(repo, signature_tag(manifest_digest))
    except ManifestNotFound as exc:
        raise SignatureError(f"{repo}@{manifest_digest} is not signed") from exc
    try:
        manifest = json.loads(raw)
        layer = manifest["layers"][0]
        signature = base64.b64decode(layer["annotations"][SIGNATURE_ANNOTATION])
        if manifest["subject"]["digest"] != manifest_digest:
            raise SignatureError("signature manifest points at another image")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise SignatureError(
            f"signature manifest of {manifest_digest} is malformed: {exc}"
        ) from exc
    payload = await client.get_blob(repo, layer["digest"])
    return Signature(payload, signature)


async def verify_image(
    client: OciClient, repo: str, manifest_digest: str, key: Ed25519PublicKey
) -> dict[str, Any]:
    """Fetch and verify the signature of an image; its claims, or SignatureError."""
    return verify_signature(
        key, await fetch_signature(client, repo, manifest_digest), manifest_digest
    )


def public_pem(key: Ed25519PrivateKey) -> bytes:
    """The public half of ``key`` as PEM."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


__all__ = ["sha256"]
