"""The module store: OCI Distribution client, reproducible images, signatures."""

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

__all__ = [
    "BlobNotFound",
    "Descriptor",
    "DigestMismatch",
    "ManifestNotFound",
    "OciClient",
    "OciError",
    "RegistryUnavailable",
    "sha256",
]
