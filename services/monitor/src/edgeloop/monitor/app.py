"""Wiring of the monitor: kit Service + telemetry consumer + window evaluator + API."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edgeloop.kit.api import serve_api
from edgeloop.kit.service import Service, configure_logging
from edgeloop.monitor.api import create_api
from edgeloop.monitor.canary import register_cohort_handlers
from edgeloop.monitor.config import MonitorSettings
from edgeloop.monitor.evaluate import Evaluator
from edgeloop.monitor.handlers import register_handlers
from edgeloop.monitor.references import References

MIGRATIONS = Path(__file__).resolve().parents[3] / "migrations"


def build(settings: MonitorSettings) -> Service:
    """The monitor service, ready to ``run()``."""
    svc = Service("monitor", settings, migrations=MIGRATIONS)
    refs = References(settings.registry_api, settings.registry_token.get_secret_value())
    register_cohort_handlers(svc)
    register_handlers(
        svc,
        refs,
        window_seconds=settings.window_seconds,
        max_count=settings.max_batch_count,
        batch_size=settings.batch_size,
        lease_seconds=settings.partition_lease_seconds,
        owner=settings.instance_id,
    )

    @svc.background
    async def evaluate(service: Service) -> None:
        evaluator = Evaluator(
            service.pool, service.schema, refs, grace_seconds=settings.grace_seconds
        )
        await evaluator.run(settings.evaluate_seconds)

    @svc.background
    async def api(service: Service) -> None:
        await serve_api(
            create_api(lambda: service.pool, settings.tokens(), refs),
            settings.api_host,
            settings.api_port,
        )

    return svc


def main() -> None:
    """``edgeloop-monitor`` / ``python -m edgeloop.monitor``."""
    settings = MonitorSettings()
    configure_logging(settings.log_level)
    asyncio.run(build(settings).run())
