"""Builder settings (``EDGELOOP_BUILDER_…``)."""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from edgeloop.kit.settings import ServiceSettings, secret_field


class BuilderSettings(ServiceSettings):
    """Settings of the builder service."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_BUILDER_", extra="ignore")

    signing_key: SecretStr = secret_field(
        "Ed25519 private key (PEM) that signs every image manifest"
    )
    image_prefix: str = "edgeloop/images"
    """OCI repository prefix; a model's images go to <prefix>/<name>."""
    base_image: str | None = None
    """Runtime base image in the same registry, ``repository:tag``; none: model-only image."""
    backend: Literal["oci", "docker"] = "oci"
    """``oci``: daemonless and reproducible; ``docker``: a Docker engine builds a generated
    Dockerfile with a model server."""
    docker_host: str | None = None
    """Docker engine address (default: DOCKER_HOST / the local socket)."""
    docker_base_image: str = "edgeloop/runtime-base:py311"
    """Image the Docker backend builds FROM (a local image or a registry reference)."""
    max_attempts: int = 4
    """Attempts (with back-off) before a build is given up and reported failed."""
    retry_backoff: str = "1,3,10,30"
    """Seconds between attempts, comma separated."""
