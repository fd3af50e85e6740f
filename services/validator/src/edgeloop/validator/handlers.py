"""``image.built`` → validate → ``validation.passed`` (image tagged) or ``validation.failed``."""

from __future__ import annotations

import json
import uuid

import httpx

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ImageBuilt, ValidationFailed, ValidationPassed
from edgeloop.kit import audit
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.consumer import Tx
from edgeloop.kit.oci import OciError
from edgeloop.kit.service import Service
from edgeloop.validator.service import Report, Validator, _repo


def register_handlers(
    svc: Service, validator: Validator, max_attempts: int, backoff: tuple[float, ...]
) -> None:
    """Subscribe the validator's consumer."""
    spec = ConsumerSpec(
        stream=s.STREAM_LIFECYCLE,
        durable=s.CONSUMER_VALIDATOR,
        filter_subjects=(s.IMAGE_BUILT,),
        max_deliver=max_attempts + 1,
        backoff=backoff,
        ack_wait=120,
        batch_size=1,
    )

    @svc.consume(ImageBuilt, spec)
    async def on_image_built(event: ImageBuilt, tx: Tx) -> None:
        if await tx.conn.fetchval(
            "SELECT 1 FROM reports WHERE model = $1 AND version = $2", event.model, event.version
        ):
            return  # validated before
        try:
            report = await validator.validate(event)
        except (OciError, httpx.HTTPError, OSError) as exc:
            if tx.deliveries < max_attempts:
                raise  # registry or registry API unreachable: retried with back-off
            report = Report().fail(
                f"could not validate after {tx.deliveries} attempts: {type(exc).__name__}: {exc}"
            )
        report_id = uuid.uuid4()
        full = {
            "passed": report.passed,
            "reasons": report.reasons,
            "metrics": report.metrics,
            **report.details,
        }
        await tx.conn.execute(
            """INSERT INTO reports (report_id, model, version, image, digest, passed, reasons,
                                    metrics, report)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9::jsonb)""",
            report_id,
            event.model,
            event.version,
            event.image,
            event.digest,
            report.passed,
            json.dumps(report.reasons),
            json.dumps(report.metrics),
            json.dumps(full),
        )
        await audit.record(
            tx.conn,
            service="validator",
            actor="service:validator",
            action="validation.passed" if report.passed else "validation.failed",
            subject=f"{event.model}@{event.version}",
            model=event.model,
            version=event.version,
            after={
                "report_id": str(report_id),
                "digest": event.digest,
                "metrics": report.metrics,
                "reasons": report.reasons,
            },
        )
        if not report.passed:
            await tx.publish(
                ValidationFailed(
                    model=event.model,
                    version=event.version,
                    image=event.image,
                    digest=event.digest,
                    reasons=report.reasons,
                    metrics=report.metrics,
                    report_id=report_id,
                    report=full,
                )
            )
            return
        tag = f"{event.version}-validated"
        # Tagging is idempotent (same manifest, same tag), so a retry after a crash is safe.
        await validator.oci.tag(_repo(event.image), tag, event.digest)
        await tx.publish(
            ValidationPassed(
                model=event.model,
                version=event.version,
                image=event.image,
                digest=event.digest,
                metrics=report.metrics,
                report_id=report_id,
                validated_tag=tag,
                report=full,
            )
        )
