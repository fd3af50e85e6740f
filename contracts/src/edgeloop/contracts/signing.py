"""The signature format agents and services share: Ed25519 over a "simple signing" payload.

The payload follows cosign's simple-signing shape: the repository and the manifest
digest it vouches for (``critical``), plus annotations and the signer's key id
(``optional``). An image's signature carries its **release claims** in those annotations
(:func:`release_annotations`: model, version and the model's monotonic release counter,
as ``cosign sign -a`` would put them), and those signed claims, not the desired state's
words, are what an agent enforces anti-rollback on (:class:`SignedRelease`).

A device's trust anchor (the signing key pinned at enrolment) changes only through a
**key rotation** signed by the key it replaces (:func:`verify_rotation`), with a version
that only goes up, as TUF's root rotation does.

Verification lives here, beside the wire contracts, so the edge agent checks signatures
without the services' kit; signing and storage are the kit's (``edgeloop.kit.oci.signing``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_TYPE = "edgeloop signature"
KEY_ID_CLAIM = "edgeloop.keyid"
MODEL_CLAIM = "edgeloop.model"
VERSION_CLAIM = "edgeloop.version"
RELEASE_CLAIM = "edgeloop.release"
"""The release counter: per model, assigned by the builder at build, only ever higher."""
ROTATION_TYPE = "edgeloop key rotation"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class SignatureError(Exception):
    """A signature is missing, malformed, for another image, or not by the trusted key."""


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:<64 lower-case hex>``.

    Raises:
        ValueError: anything else (other algorithms are not used here).
    """
    if not _DIGEST_RE.match(digest):
        raise ValueError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return digest


def pem_bytes(source: bytes | str | Path) -> bytes:
    """PEM bytes from bytes, PEM text, or a path (a ``Path`` or a string that isn't PEM)."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, str) and "-----BEGIN" in source:
        return source.encode()
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"can't read the key file {path}: {exc}") from exc


def load_public_key(source: bytes | str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (bytes or text) or a PEM file.

    Raises:
        SignatureError: not readable, not PEM, or not an Ed25519 key.
    """
    try:
        key = serialization.load_pem_public_key(pem_bytes(source))
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"the verification key is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"the verification key is a {type(key).__name__}, not Ed25519")
    return key


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short fingerprint of a key (sha256 of its raw public bytes, 16 hex digits).

    It names the signer in a signature so a failure can say "wrong key" rather than
    "bad signature"; it decides nothing (the signature check does).
    """
    return fingerprint(key).removeprefix("sha256:")[:16]


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A key's full fingerprint, ``sha256:<64 hex>`` of its raw public bytes.

    What an operator compares out of band at enrolment (:func:`key_id` is its first 16
    hex digits).
    """
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def release_annotations(model: str, version: str, release: int) -> dict[str, str]:
    """The signed claims of a model image (the payload's ``optional`` annotations)."""
    if release < 1:
        raise ValueError(f"a release counter starts at 1, got {release}")
    return {MODEL_CLAIM: model, VERSION_CLAIM: version, RELEASE_CLAIM: str(release)}


@dataclass(frozen=True)
class SignedRelease:
    """The release an image's verified signature vouches for."""

    model: str
    version: str
    release: int

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> SignedRelease:
        """The release claims of a verified payload.

        Raises:
            SignatureError: the payload carries no (or malformed) release claims, e.g. an
                image signed before releases were signed: it must be signed again.
        """
        optional = claims.get("optional")
        if not isinstance(optional, dict):
            optional = {}
        missing = [c for c in (MODEL_CLAIM, VERSION_CLAIM, RELEASE_CLAIM) if not optional.get(c)]
        if missing:
            raise SignatureError(
                f"the signature carries no release claims ({', '.join(missing)} missing): "
                "the image must be signed again by the builder"
            )
        raw = str(optional[RELEASE_CLAIM])
        if not raw.isdigit() or int(raw) < 1:
            raise SignatureError(f"the signed release counter {raw!r} is not a positive integer")
        return cls(str(optional[MODEL_CLAIM]), str(optional[VERSION_CLAIM]), int(raw))

    def __str__(self) -> str:
        return f"{self.model}@{self.version} (release {self.release})"


@dataclass(frozen=True)
class SignaturePayload:
    """A signed payload: the exact bytes signed and the Ed25519 signature over them."""

    payload: bytes
    signature: bytes

    @property
    def signature_b64(self) -> str:
        """The signature, base64 (as stored in the registry)."""
        return base64.b64encode(self.signature).decode()

    def claims(self) -> dict[str, Any]:
        """The payload, parsed (not verified: use :func:`verify_manifest_signature`).

        Raises:
            SignatureError: the payload is not a JSON object.
        """
        try:
            claims = json.loads(self.payload)
        except ValueError as exc:
            raise SignatureError(f"signature payload is not JSON: {exc}") from exc
        if not isinstance(claims, dict):
            raise SignatureError("signature payload is not a JSON object")
        return claims

    @property
    def claimed_key_id(self) -> str | None:
        """The signer's key id the payload claims (unverified), if any."""
        try:
            value = self.claims().get("optional", {}).get(KEY_ID_CLAIM)
        except (SignatureError, AttributeError):
            return None
        return str(value) if value else None


def verify_manifest_signature(
    public_key: Ed25519PublicKey,
    payload: bytes,
    signature: bytes | str,
    expected_digest: str,
    *,
    repo: str | None = None,
) -> dict[str, Any]:
    """Check a signature and that it vouches for ``expected_digest``.

    Args:
        public_key: The trusted key.
        payload: The signed payload bytes.
        signature: The signature, raw or base64.
        expected_digest: The manifest digest the caller is about to trust.
        repo: When given, the repository the payload must name.

    Returns:
        The payload's claims.

    Raises:
        SignatureError: says which: signed by another key, bad signature (payload or
            signature altered), malformed, for another digest, or for another repository.
    """
    raw = signature_bytes(signature)
    try:
        public_key.verify(raw, payload)
    except InvalidSignature as exc:
        claimed = SignaturePayload(payload, raw).claimed_key_id
        trusted = key_id(public_key)
        if claimed and claimed != trusted:
            raise SignatureError(
                f"wrong key: signed by key {claimed}, not by the trusted key {trusted}"
            ) from exc
        raise SignatureError(
            "bad signature: it does not verify with the trusted key "
            f"{trusted} (the payload or the signature was altered)"
        ) from exc
    claims = SignaturePayload(payload, raw).claims()
    try:
        critical = claims["critical"]
        signed = critical["image"]["docker-manifest-digest"]
        kind = critical["type"]
        identity = critical["identity"]["docker-reference"]
    except (KeyError, TypeError) as exc:
        raise SignatureError(f"signature payload is malformed: missing {exc}") from exc
    if kind != SIGNATURE_TYPE:
        raise SignatureError(f"signature payload has type {kind!r}, not {SIGNATURE_TYPE!r}")
    if signed != expected_digest:
        raise SignatureError(
            f"digest mismatch: the signature is for {signed}, not for {expected_digest}"
        )
    if repo is not None and identity != repo:
        raise SignatureError(f"the signature is for an image of {identity!r}, not of {repo!r}")
    return claims


def signature_bytes(signature: bytes | str) -> bytes:
    if isinstance(signature, bytes):
        return signature
    try:
        return base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"signature is not valid base64: {exc}") from exc


@dataclass(frozen=True)
class KeyRotation:
    """A verified rotation: ``key`` replaces the key ``previous`` names."""

    version: int
    previous: str
    key: Ed25519PublicKey
    fingerprint: str


def rotation_payload(previous: str, new_key: Ed25519PublicKey, version: int) -> bytes:
    """The bytes a rotation's old key signs (sorted-key JSON)."""
    pem = new_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return json.dumps(
        {
            "type": ROTATION_TYPE,
            "version": version,
            "previous": previous,
            "key": pem,
            "fingerprint": fingerprint(new_key),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def rotation_previous(payload: bytes) -> tuple[str, int] | None:
    """(the fingerprint of the key a rotation replaces, its version), unverified; None
    when the payload is not a rotation at all."""
    try:
        claims = json.loads(payload)
        return str(claims["previous"]), int(claims["version"])
    except (ValueError, KeyError, TypeError):
        return None


def verify_rotation(
    pinned: Ed25519PublicKey, pinned_version: int, payload: bytes, signature: bytes | str
) -> KeyRotation:
    """Check that a key rotation is signed by the pinned key and newer than the pin.

    Args:
        pinned: The key the device trusts now (the one the rotation replaces).
        pinned_version: The version of the trust the device holds (0: as enrolled).
        payload: The rotation's signed bytes (:func:`rotation_payload`).
        signature: The Ed25519 signature over ``payload``, raw or base64.

    Returns:
        The rotation: the new key, its fingerprint and the new version.

    Raises:
        SignatureError: unsigned, not signed by ``pinned``, malformed, for another key,
            not newer than ``pinned_version`` (a replay), or the new key's fingerprint
            does not match the key.
    """
    if not signature:
        raise SignatureError("key rotation refused: it is not signed")
    trusted = fingerprint(pinned)
    try:
        pinned.verify(signature_bytes(signature), payload)
    except InvalidSignature as exc:
        raise SignatureError(
            f"key rotation refused: it is not signed by the pinned key {trusted}"
        ) from exc
    try:
        claims = json.loads(payload)
        kind, version = claims["type"], int(claims["version"])
        previous, pem, claimed = str(claims["previous"]), claims["key"], str(claims["fingerprint"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"key rotation refused: malformed payload ({exc!r})") from exc
    if kind != ROTATION_TYPE:
        raise SignatureError(f"key rotation refused: payload type {kind!r}")
    if previous != trusted:
        raise SignatureError(f"key rotation refused: it replaces {previous}, not {trusted}")
    if version <= pinned_version:
        raise SignatureError(
            f"key rotation refused: version {version} is not newer than {pinned_version}"
        )
    key = load_public_key(str(pem))
    if fingerprint(key) != claimed:
        raise SignatureError(
            f"key rotation refused: the new key is {fingerprint(key)}, the payload says {claimed}"
        )
    return KeyRotation(version, previous, key, claimed)
