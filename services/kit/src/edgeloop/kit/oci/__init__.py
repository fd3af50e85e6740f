"""The module store: OCI Distribution client, reproducible images, signatures.

- :mod:`.client`: ``OciClient`` and its errors (blobs, manifests, tags, retries).
- :mod:`.image`: reproducible model images (``build_model_image``, ``push_image``,
  ``pull_file``).
- :mod:`.signing`: Ed25519 signatures stored next to the image in the referrers tag
  schema (``attach_signature``, ``fetch_and_verify_signature``).
"""

from edgeloop.kit.oci.client import (
    BlobNotFound,
    Descriptor,
    DigestMismatch,
    ManifestNotFound,
    OciClient,
    OciError,
    RegistryUnavailable,
    sha256,
)
from edgeloop.kit.oci.image import BaseImage, BuiltImage, build_model_image, pull_file, push_image
from edgeloop.kit.oci.signing import (
    SignatureError,
    SignaturePayload,
    attach_signature,
    fetch_and_verify_signature,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest_signature,
)

__all__ = [
    "BaseImage",
    "BlobNotFound",
    "BuiltImage",
    "Descriptor",
    "DigestMismatch",
    "ManifestNotFound",
    "OciClient",
    "OciError",
    "RegistryUnavailable",
    "SignatureError",
    "SignaturePayload",
    "attach_signature",
    "build_model_image",
    "fetch_and_verify_signature",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "pull_file",
    "push_image",
    "sha256",
    "sign_manifest",
    "verify_manifest_signature",
]
