"""A small service built from the kit, used by the kit's guarantee tests.

It consumes ``ModelCommitted`` events on one subject, records an effect row per event
(counting rows per event id shows whether the inbox works) and, optionally, emits a
follow-up event through the outbox. ``version == "poison"`` makes the handler raise;
``"as-smallint"`` makes it cast the model name to a smallint in PostgreSQL.
Run: ``python sample_app.py`` with ``EDGELOOP_SAMPLE_*`` variables.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic_settings import SettingsConfigDict

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ImageBuildFailed, ModelCommitted
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.consumer import PermanentError, Tx
from edgeloop.kit.service import Service, configure_logging
from edgeloop.kit.settings import ServiceSettings
from edgeloop.kit.tracing import current_trace_id


class SampleSettings(ServiceSettings):
    """Settings of the sample service."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_SAMPLE_", extra="ignore")

    schema_name: str = "sample"
    """PostgreSQL schema."""
    subject: str = "model.sample"
    """Subject to consume."""
    durable: str = "sample"
    """Durable consumer name."""
    emit_subject: str | None = None
    """If set, each handled event emits an ImageBuildFailed on this subject (outbox)."""
    ack_wait: float = 30.0
    """Consumer ack wait."""
    max_deliver: int = 3
    """Attempts before dead-lettering."""
    backoff: str = "0.2,0.4,0.8"
    """Comma-separated back-off seconds."""
    handler_sleep: float = 0.0
    """Seconds each handler sleeps (graceful shutdown tests)."""


def build(settings: SampleSettings) -> Service:
    """Wire the sample service."""
    svc = Service(
        "sample",
        settings,
        schema=settings.schema_name,
        migrations=Path(__file__).parent / "sample_sql",
    )
    spec = ConsumerSpec(
        stream=s.STREAM_LIFECYCLE,
        durable=settings.durable,
        filter_subjects=(settings.subject,),
        max_deliver=settings.max_deliver,
        backoff=tuple(float(x) for x in settings.backoff.split(",") if x),
        ack_wait=settings.ack_wait,
    )

    @svc.consume(ModelCommitted, spec)
    async def on_model_committed(event: ModelCommitted, tx: Tx) -> None:
        if event.version == "poison":
            raise RuntimeError(f"cannot handle {event.model}@{event.version}")
        if event.version == "invalid":
            raise PermanentError(f"{event.model}@{event.version} refers to nothing")
        if event.version == "as-smallint":  # the model name stored where it may not fit
            await tx.conn.execute("SELECT $1::text::smallint", event.model)
        if settings.handler_sleep:
            await asyncio.sleep(settings.handler_sleep)
        await tx.conn.execute(
            "INSERT INTO effects (event_id, model, version, deliveries, trace_id) "
            "VALUES ($1, $2, $3, $4, $5)",
            event.event_id,
            event.model,
            event.version,
            tx.deliveries,
            current_trace_id(),
        )
        if settings.emit_subject:
            await tx.publish(
                ImageBuildFailed(model=event.model, version=event.version, reason="sample"),
                subject=settings.emit_subject,
            )

    return svc


def main() -> None:
    """Entry point."""
    settings = SampleSettings()
    configure_logging(settings.log_level)
    asyncio.run(build(settings).run())


if __name__ == "__main__":
    main()
