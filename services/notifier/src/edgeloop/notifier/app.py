"""Wiring of the notifier: kit Service + lifecycle consumer + delivery worker + API."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edgeloop.kit.api import serve_api
from edgeloop.kit.partitions import default_owner
from edgeloop.kit.service import Service, configure_logging
from edgeloop.kit.sweep import periodically
from edgeloop.notifier.api import create_api
from edgeloop.notifier.config import NotifierSettings
from edgeloop.notifier.handlers import register_handlers
from edgeloop.notifier.service import Deliverer
from edgeloop.notifier.store import PgDeliveries

MIGRATIONS = Path(__file__).resolve().parents[3] / "migrations"


def build(settings: NotifierSettings) -> Service:
    """The notifier service, ready to ``run()``."""
    svc = Service("notifier", settings, migrations=MIGRATIONS)
    deliveries_store = PgDeliveries(lambda: svc.pool)
    deliverer = Deliverer(
        deliveries_store,
        owner=settings.instance_id or default_owner(),
        max_attempts=settings.max_attempts,
        retry_base=settings.retry_base_seconds,
        retry_max=settings.retry_max_seconds,
        timeout=settings.request_timeout_seconds,
        concurrency=settings.concurrency,
        poll_seconds=settings.poll_seconds,
        lease_seconds=settings.lease_seconds,
    )
    register_handlers(svc, deliverer)

    @svc.background
    async def deliveries(_: Service) -> None:
        await deliverer.run()

    if settings.delivery_retention_seconds > 0:

        @svc.background
        async def prune_deliveries(_: Service) -> None:
            await periodically(
                lambda: deliveries_store.prune(settings.delivery_retention_seconds),
                settings.prune_every_seconds,
                what="pruning finished deliveries",
            )

    @svc.background
    async def api(service: Service) -> None:
        await serve_api(
            create_api(lambda: service.pool, settings.tokens(), deliverer.wake),
            settings.api_host,
            settings.api_port,
        )

    return svc


def main() -> None:
    """``edgeloop-notifier`` / ``python -m edgeloop.notifier``."""
    settings = NotifierSettings()
    configure_logging(settings.log_level)
    asyncio.run(build(settings).run())
