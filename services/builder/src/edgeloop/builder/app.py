"""Wiring of the builder service."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edgeloop.builder.config import BuilderSettings
from edgeloop.builder.docker_backend import DockerBackend
from edgeloop.builder.handlers import register_handlers
from edgeloop.builder.service import Builder
from edgeloop.kit.oci import OciClient
from edgeloop.kit.oci.signing import load_private_key
from edgeloop.kit.service import Service, configure_logging

MIGRATIONS = Path(__file__).resolve().parents[3] / "migrations"


def build(settings: BuilderSettings) -> Service:
    """The builder service, ready to ``run()``."""
    svc = Service("builder", settings, migrations=MIGRATIONS)
    oci = OciClient(settings.oci_registry_url)
    builder = Builder(
        oci,
        load_private_key(settings.signing_key.get_secret_value()),
        image_prefix=settings.image_prefix,
        base_image=settings.base_image,
        docker=DockerBackend(settings.docker_base_image, settings.docker_host)
        if settings.backend == "docker"
        else None,
    )
    backoff = tuple(float(x) for x in settings.retry_backoff.split(",") if x.strip())
    register_handlers(svc, builder, settings.max_attempts, backoff)
    return svc


def main() -> None:
    """``python -m edgeloop.builder``."""
    settings = BuilderSettings()
    configure_logging(settings.log_level)
    asyncio.run(build(settings).run())
