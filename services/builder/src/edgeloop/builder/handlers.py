"""``model.committed`` → build, push, sign → ``image.built`` (or ``image.build_failed``)."""

from __future__ import annotations

import logging

from edgeloop.builder.docker_backend import DockerBuildError
from edgeloop.builder.service import Builder, BuildError
from edgeloop.builder.store import next_release
from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ImageBuildFailed, ModelCommitted
from edgeloop.kit import audit
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.consumer import Tx
from edgeloop.kit.oci import OciError
from edgeloop.kit.service import Service

log = logging.getLogger(__name__)


def register_handlers(
    svc: Service, builder: Builder, max_attempts: int, backoff: tuple[float, ...]
) -> None:
    """Subscribe the builder's consumer."""
    spec = ConsumerSpec(
        stream=s.STREAM_LIFECYCLE,
        durable=s.CONSUMER_BUILDER,
        filter_subjects=(s.MODEL_COMMITTED,),
        # The handler gives up itself on the last attempt (image.build_failed); the kit's
        # dead-lettering is the backstop for what it cannot report.
        max_deliver=max_attempts + 1,
        backoff=backoff,
        ack_wait=120,
        batch_size=1,
    )

    @svc.consume(ModelCommitted, spec)
    async def on_model_committed(event: ModelCommitted, tx: Tx) -> None:
        done = await tx.conn.fetchval(
            "SELECT state FROM builds WHERE model = $1 AND version = $2",
            event.model,
            event.version,
        )
        if done is not None:
            return  # built (or given up) before: a re-sent event has no second effect
        try:
            release = await next_release(tx.conn, event.model)
            result = await builder.build(event, release=release)
        except (BuildError, DockerBuildError, OciError, OSError) as exc:
            permanent = isinstance(exc, BuildError)
            if not permanent and tx.deliveries < max_attempts:
                raise  # transient: retried with back-off
            reason = f"{type(exc).__name__}: {exc}"
            await tx.conn.execute(
                """INSERT INTO builds (model, version, state, attempts, reason)
                   VALUES ($1, $2, 'failed', $3, $4)""",
                event.model,
                event.version,
                tx.deliveries,
                reason,
            )
            await tx.publish(
                ImageBuildFailed(
                    model=event.model, version=event.version, reason=reason, attempts=tx.deliveries
                )
            )
            await audit.record(
                tx.conn,
                service="builder",
                actor="service:builder",
                action="image.build_failed",
                subject=f"{event.model}@{event.version}",
                model=event.model,
                version=event.version,
                reason=reason,
            )
            log.warning("build of %s@%s failed: %s", event.model, event.version, reason)
            return
        built = result.event
        await tx.conn.execute(
            """INSERT INTO builds
                   (model, version, state, image, digest, size, signature, attempts, release)
               VALUES ($1, $2, 'built', $3, $4, $5, $6, $7, $8)""",
            event.model,
            event.version,
            built.image,
            built.digest,
            built.size,
            result.signature_digest,
            tx.deliveries,
            release,
        )
        await tx.publish(built)
        await audit.record(
            tx.conn,
            service="builder",
            actor="service:builder",
            action="image.build",
            subject=f"{event.model}@{event.version}",
            model=event.model,
            version=event.version,
            after={
                "image": built.image,
                "digest": built.digest,
                "signature": result.signature_digest,
                "release": release,
            },
        )
