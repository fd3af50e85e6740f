"""Wiring of the deployer: kit Service (NATS, PostgreSQL, outbox, consumers, health) +
the rollout engine + the HTTP API."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

from edgeloop.deployer.admission import Admission
from edgeloop.deployer.api import create_api
from edgeloop.deployer.config import DeployerSettings
from edgeloop.deployer.engine import Engine, shifted_clock
from edgeloop.deployer.handlers import register_handlers
from edgeloop.deployer.retire import Retirements
from edgeloop.deployer.sources import Devices, Monitor, Registry
from edgeloop.deployer.store import Store
from edgeloop.deployer.twin import Twin
from edgeloop.kit.api import serve_api
from edgeloop.kit.service import Service, configure_logging
from edgeloop.kit.supervise import together
from edgeloop.kit.sweep import periodically
from edgeloop.kit.tracing import tracer

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parents[3] / "migrations"


def build(settings: DeployerSettings) -> Service:
    """The deployer service, ready to ``run()``."""
    svc = Service("deployer", settings, migrations=MIGRATIONS)
    devices = Devices(settings.gateway_api, settings.gateway_token.get_secret_value())
    admission = Admission(
        Registry(settings.registry_api, settings.registry_token.get_secret_value()),
        devices,
        Store(),
        tracer(svc.tracer_provider, "edgeloop.deployer"),
        max_silence=settings.presence_max_silence_seconds,
    )
    engine: list[Engine] = []

    def wake(rollout_id: uuid.UUID | None) -> None:
        if engine:
            engine[0].wake(rollout_id)

    backoff = tuple(float(x) for x in settings.retry_backoff.split(",") if x.strip())
    register_handlers(svc, admission, wake, max_attempts=settings.max_attempts, backoff=backoff)

    @svc.background
    async def drive(service: Service) -> None:
        twin = Twin(service.js, concurrency=settings.kv_concurrency)
        await twin.start()
        engine.append(
            Engine(
                service.pool,
                service.schema,
                twin,
                devices,
                owner=settings.instance_id,
                lease_seconds=settings.lease_seconds,
                tick=settings.tick_seconds,
                max_silence=settings.presence_max_silence_seconds,
                offline_grace=settings.offline_grace_seconds,
                tracer=tracer(service.tracer_provider, "edgeloop.deployer"),
                clock=shifted_clock(settings.clock_shift_file)
                if settings.clock_shift_file
                else None,
                monitor=Monitor(
                    settings.monitor_api,
                    (settings.monitor_token or settings.registry_token).get_secret_value(),
                ),
            )
        )
        retirements = Retirements(lambda: service.pool, service.schema, admission, wake)
        api = serve_api(
            create_api(
                lambda: service.pool,
                service.schema,
                admission,
                twin,
                wake,
                settings.tokens(),
                retirements,
            ),
            settings.api_host,
            settings.api_port,
        )
        sweep = periodically(
            retirements.sweep, settings.retirement_sweep_seconds, what="retirement sweep"
        )
        try:  # the engine, its API and the sweep live and die (and restart) together
            await together(engine[0].run(), api, sweep)
        finally:
            engine.clear()
            await twin.stop()

    return svc


def main() -> None:
    """``edgeloop-deployer`` / ``python -m edgeloop.deployer``."""
    settings = DeployerSettings()
    configure_logging(settings.log_level)
    asyncio.run(build(settings).run())
