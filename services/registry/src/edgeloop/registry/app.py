"""Wiring of the registry service: kit Service (consumers, outbox relay, health) plus the
HTTP API served by uvicorn in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from edgeloop.kit.api import serve_api
from edgeloop.kit.oci import OciClient
from edgeloop.kit.service import Service, configure_logging
from edgeloop.kit.sweep import periodically
from edgeloop.kit.tracing import tracer
from edgeloop.registry.api import create_api
from edgeloop.registry.archive import Archiver
from edgeloop.registry.artifacts import OciArtifactStore
from edgeloop.registry.checks import Limits, WorkerChecks
from edgeloop.registry.config import RegistrySettings
from edgeloop.registry.deadletters import DlqWatch
from edgeloop.registry.handlers import register_handlers
from edgeloop.registry.service import Registry
from edgeloop.registry.store import PgStore

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parents[3] / "migrations"


def build(settings: RegistrySettings) -> Service:
    """The registry service, ready to ``run()``."""
    svc = Service("registry", settings, migrations=MIGRATIONS)
    register_handlers(svc)

    @svc.background
    async def api(service: Service) -> None:
        oci = OciClient(settings.oci_registry_url)
        store = PgStore(service.pool, service.schema)
        registry = Registry(
            store,
            OciArtifactStore(oci),
            repository_prefix=settings.repository_prefix,
            max_model_bytes=settings.max_model_bytes,
            max_data_bytes=settings.max_data_bytes,
            checks=WorkerChecks(
                Limits(
                    cpu_seconds=settings.check_cpu_seconds,
                    memory_bytes=settings.check_memory_bytes,
                    timeout_seconds=settings.check_timeout_seconds,
                    unpacked_bytes=settings.max_unpacked_bytes,
                    profile_bins=settings.profile_bins,
                ),
                settings.check_workers,
            ),
            min_thresholds=settings.min_thresholds,
            tracer=tracer(service.tracer_provider, "edgeloop.registry"),
        )
        archiver = Archiver(store, oci, settings.retention_seconds)
        watch = DlqWatch(store, lambda: service.js)
        sweeps = [
            asyncio.create_task(
                periodically(archiver.sweep, settings.archive_sweep_seconds, what="archival sweep"),
                name="registry-archival",
            ),
            asyncio.create_task(
                periodically(watch.check, settings.dlq_check_seconds, what="DLQ limits check"),
                name="registry-dlq-watch",
            ),
        ]
        try:
            await serve_api(
                create_api(registry, store, settings.tokens(), settings.retention_seconds),
                settings.api_host,
                settings.api_port,
            )
        finally:
            for sweep in sweeps:
                sweep.cancel()
                with contextlib.suppress(BaseException):
                    await sweep
            with contextlib.suppress(Exception):
                await oci.aclose()

    return svc


def main() -> None:
    """``python -m edgeloop.registry``."""
    settings = RegistrySettings()
    configure_logging(settings.log_level)
    asyncio.run(build(settings).run())
