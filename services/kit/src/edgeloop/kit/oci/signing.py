"""Ed25519 signatures of image manifests, stored next to the image.

The signed payload follows cosign's "simple signing" shape: the repository and the
manifest digest it vouches for (``critical``), plus free annotations and the signer's
key id (``optional``).

Storage: Debian's Distribution registry 2.8 has no OCI 1.1 referrers API, so signatures
use the referrers *tag schema* OCI 1.1 defines as the fallback (and cosign uses): an
image manifest with ``artifactType`` :data:`SIGNATURE_ARTIFACT`, whose ``subject`` is the
signed manifest, tagged ``sha256-<hex>.sig``. Each signature is one layer: the payload as
a blob, the signature (base64) and key id in the layer's annotations. Signing again
appends a layer, as cosign does, so a key rotation or a second signer keeps the earlier
signatures; verification accepts the image when any layer verifies with the trusted key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, overload

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeloop.contracts.signing import (
    KEY_ID_CLAIM,
    SIGNATURE_TYPE,
    SignatureError,
    SignaturePayload,
    fingerprint,
    key_id,
    load_public_key,
    pem_bytes,
    rotation_payload,
    signature_bytes,
    verify_manifest_signature,
)
from edgeloop.kit.oci.client import (
    MANIFEST_OCI,
    BlobNotFound,
    Descriptor,
    ManifestNotFound,
    OciClient,
    check_digest,
)

__all__ = [
    "KEY_ID_CLAIM",
    "SIGNATURE_TYPE",
    "SignatureError",
    "SignaturePayload",
    "attach_signature",
    "fetch_and_verify_signature",
    "fetch_signatures",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_pem",
    "sign_manifest",
    "sign_rotation",
    "signature_tag",
    "store_signature",
    "verify_image",
    "verify_manifest_signature",
]

SIGNATURE_ARTIFACT = "application/vnd.edgeloop.signature.v1+json"
PAYLOAD_MEDIA = "application/vnd.edgeloop.signature.payload.v1+json"
EMPTY_MEDIA = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
SIGNATURE_ANNOTATION = "dev.edgeloop.signature"
KEY_ID_ANNOTATION = "dev.edgeloop.signature.keyid"


# --- keys ------------------------------------------------------------------------------


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair.

    Returns:
        (private key as unencrypted PKCS#8 PEM, public key as SubjectPublicKeyInfo PEM).
    """
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return private, public_pem(key)


def load_private_key(source: bytes | str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (bytes or text) or a PEM file.

    Raises:
        SignatureError: not readable, not PEM, encrypted, or not an Ed25519 key.
    """
    try:
        key = serialization.load_pem_private_key(pem_bytes(source), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"the signing key is not an unencrypted PEM key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"the signing key is a {type(key).__name__}, not Ed25519")
    return key


def public_pem(key: Ed25519PrivateKey) -> bytes:
    """The public half of ``key`` as PEM."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- payloads --------------------------------------------------------------------------


def sign_manifest(
    private_key: Ed25519PrivateKey,
    repo: str,
    manifest_digest: str,
    annotations: dict[str, str] | None = None,
) -> SignaturePayload:
    """Sign that ``manifest_digest`` is an image of ``repo``.

    Args:
        private_key: The signer's key.
        repo: Repository of the image (the payload's ``docker-reference``).
        manifest_digest: The image manifest's digest.
        annotations: Free claims (the payload's ``optional``), e.g. the model version.

    Returns:
        The payload and its signature.
    """
    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": repo},
                "image": {"docker-manifest-digest": check_digest(manifest_digest)},
                "type": SIGNATURE_TYPE,
            },
            "optional": {**(annotations or {}), KEY_ID_CLAIM: key_id(private_key)},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return SignaturePayload(payload, private_key.sign(payload))


def sign_rotation(
    old_key: Ed25519PrivateKey, new_key: Ed25519PublicKey, version: int
) -> SignaturePayload:
    """A key rotation: ``old_key`` vouches that ``new_key`` replaces it.

    Devices that pinned ``old_key`` accept it when ``version`` is higher than the
    version of the trust they hold (``edgeloop.contracts.signing.verify_rotation``).
    """
    payload = rotation_payload(fingerprint(old_key), new_key, version)
    return SignaturePayload(payload, old_key.sign(payload))


# --- storage next to the image ---------------------------------------------------------


def signature_tag(manifest_digest: str) -> str:
    """The referrers tag-schema tag of a manifest's signatures (``sha256-<hex>.sig``)."""
    return check_digest(manifest_digest).replace(":", "-") + ".sig"


@overload
async def attach_signature(
    client: OciClient,
    repo: str,
    manifest_digest: str,
    private_key: Ed25519PrivateKey,
    *,
    annotations: dict[str, str] | None = None,
) -> str: ...


@overload
async def attach_signature(
    client: OciClient,
    repo: str,
    manifest_digest: str,
    manifest_size: int,
    sig: SignaturePayload,
    media_type: str = MANIFEST_OCI,
    /,
) -> str: ...


async def attach_signature(
    client: OciClient,
    repo: str,
    manifest_digest: str,
    private_key: Ed25519PrivateKey | int,
    sig: SignaturePayload | None = None,
    media_type: str = MANIFEST_OCI,
    *,
    annotations: dict[str, str] | None = None,
) -> str:
    """Sign an image and store the signature next to it (tag ``sha256-<hex>.sig``).

    The subject descriptor (media type and size of the signed manifest) is read from
    the registry, so Docker-built (``application/vnd.docker...``) images work as well.

    The second form, ``attach_signature(client, repo, digest, manifest_size, sig,
    media_type)``, stores a signature made earlier with :func:`sign_manifest`; it is the
    original call the builder uses and stays until the builder moves to the first form.

    Args:
        client: The registry.
        repo: Repository of the image.
        manifest_digest: The image's manifest digest.
        private_key: The signing key.
        sig: (second form) A signature made with :func:`sign_manifest`.
        media_type: (second form) Media type of the signed manifest.
        annotations: Free claims added to the signed payload.

    Returns:
        The digest of the signature manifest.

    Raises:
        ManifestNotFound: (first form) no manifest ``manifest_digest`` in ``repo``.
    """
    if isinstance(private_key, Ed25519PrivateKey):
        subject = await client.resolve(repo, manifest_digest)
        sig = sign_manifest(private_key, repo, manifest_digest, annotations)
    elif sig is not None:
        subject = Descriptor(media_type, manifest_digest, private_key)
    else:
        raise TypeError("attach_signature needs a private key, or a size and a signature")
    return await store_signature(client, repo, subject, sig)


async def store_signature(
    client: OciClient, repo: str, subject: Descriptor, sig: SignaturePayload
) -> str:
    """Add ``sig`` to the signature manifest of ``subject`` (created when absent).

    Returns:
        The digest of the signature manifest.
    """
    empty = await client.push_blob(repo, EMPTY_BLOB, EMPTY_MEDIA)
    payload = await client.push_blob(repo, sig.payload, PAYLOAD_MEDIA)
    layer = Descriptor(
        PAYLOAD_MEDIA,
        payload.digest,
        payload.size,
        {
            SIGNATURE_ANNOTATION: sig.signature_b64,
            **({KEY_ID_ANNOTATION: sig.claimed_key_id} if sig.claimed_key_id else {}),
        },
    ).as_dict()
    # Keep earlier signatures (another key, another signer), dropping an identical one so
    # that signing twice is idempotent.
    layers = [old for old in await _existing_layers(client, repo, subject.digest) if old != layer]
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_OCI,
        "artifactType": SIGNATURE_ARTIFACT,
        "config": empty.as_dict(),
        "layers": [*layers, layer],
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).as_dict(),
    }
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return await client.put_manifest(repo, signature_tag(subject.digest), body)


async def _existing_layers(
    client: OciClient, repo: str, manifest_digest: str
) -> list[dict[str, Any]]:
    """The signature layers already stored for ``manifest_digest`` ([] if none/unusable)."""
    try:
        raw, _, _ = await client.get_manifest(repo, signature_tag(manifest_digest))
        manifest = json.loads(raw)
    except (ManifestNotFound, ValueError):
        return []
    if manifest.get("subject", {}).get("digest") != manifest_digest:
        return []  # not ours to extend: it is replaced
    return [dict(x) for x in manifest.get("layers", []) if x.get("mediaType") == PAYLOAD_MEDIA]


async def fetch_signatures(
    client: OciClient, repo: str, manifest_digest: str
) -> list[SignaturePayload]:
    """Every signature stored for ``manifest_digest`` (not yet verified).

    Raises:
        SignatureError: the image is not signed, or its signature manifest is malformed
            or points at another manifest.
    """
    try:
        raw, _, _ = await client.get_manifest(repo, signature_tag(manifest_digest))
    except ManifestNotFound as exc:
        raise SignatureError(f"{repo}@{manifest_digest} is not signed") from exc
    try:
        manifest = json.loads(raw)
        if manifest["subject"]["digest"] != manifest_digest:
            raise SignatureError(
                f"the signature manifest of {manifest_digest} points at "
                f"{manifest['subject']['digest']}"
            )
        entries = [
            (check_digest(x["digest"]), signature_bytes(x["annotations"][SIGNATURE_ANNOTATION]))
            for x in manifest["layers"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(
            f"the signature manifest of {manifest_digest} is malformed: {exc!r}"
        ) from exc
    if not entries:
        raise SignatureError(f"the signature manifest of {manifest_digest} has no signature")
    out = []
    for digest, signature in entries:
        try:
            payload = await client.get_blob(repo, digest)
        except BlobNotFound as exc:
            raise SignatureError(f"signature payload {digest} is missing: {exc}") from exc
        out.append(SignaturePayload(payload, signature))
    return out


async def fetch_and_verify_signature(
    client: OciClient, repo: str, manifest_digest: str, public_key: Ed25519PublicKey
) -> dict[str, Any]:
    """Fetch the signatures stored next to an image and verify them with the trusted key.

    The image is accepted when one signature verifies with ``public_key``, vouches for
    ``manifest_digest`` and names ``repo``.

    Returns:
        The claims of the signature that verified.

    Raises:
        SignatureError: unsigned, or no signature verifies (the message gives each
            signature's reason: wrong key, bad signature, digest mismatch...).
        RegistryUnavailable: the registry could not be reached (not a verdict).
    """
    reasons = []
    for sig in await fetch_signatures(client, repo, manifest_digest):
        try:
            return verify_manifest_signature(
                public_key, sig.payload, sig.signature, manifest_digest, repo=repo
            )
        except SignatureError as exc:
            reasons.append(str(exc))
    if len(reasons) == 1:
        raise SignatureError(reasons[0])
    raise SignatureError(
        f"none of the {len(reasons)} signatures of {repo}@{manifest_digest} verifies: "
        + "; ".join(reasons)
    )


# The validator and the builder's tests call it by this name; new code should use
# ``fetch_and_verify_signature``.
verify_image = fetch_and_verify_signature
