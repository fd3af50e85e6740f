"""Event handlers: the registry keeps a projection of builds, validations and retrain
requests so ``models show`` can tell a version's whole state (it never reads other
services' tables)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import (
    ImageBuildFailed,
    ImageBuilt,
    RetrainRequested,
    ValidationFailed,
    ValidationPassed,
)
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.consumer import PermanentError, Tx
from edgeloop.kit.service import Service

CANDIDATE_ALIAS = "candidate"


def _spec(durable: str, subject: str) -> ConsumerSpec:
    return ConsumerSpec(stream=s.STREAM_LIFECYCLE, durable=durable, filter_subjects=(subject,))


async def _project(
    tx: Tx,
    model: str,
    version: str,
    kind: str,
    state: str,
    detail: Mapping[str, object],
    *,
    unless: str | None = None,
) -> bool:
    """Record a build or validation outcome on the version; whether a row changed.

    ``unless``: leave a version already in that state alone (a late failure of a build
    that a retry since completed must not overwrite it).
    """
    guard = f" AND {kind}_state <> '{unless}'" if unless else ""
    status = await tx.conn.execute(
        f"""UPDATE versions SET {kind}_state = $3, {kind}_detail = $4::jsonb
            WHERE model = $1 AND version = $2{guard}""",
        model,
        version,
        state,
        json.dumps(detail),
    )
    return bool(status == "UPDATE 1")


def register_handlers(svc: Service) -> None:
    """Subscribe the registry's consumers."""

    @svc.consume(ImageBuilt, _spec("registry-image-built", s.IMAGE_BUILT))
    async def on_image_built(event: ImageBuilt, tx: Tx) -> None:
        detail = {
            "image": event.image,
            "digest": event.digest,
            "size": event.size,
            "signature_digest": event.signature_digest,
            "backend": event.backend,
        }
        await _project(tx, event.model, event.version, "build", "built", detail)

    @svc.consume(ImageBuildFailed, _spec("registry-image-build-failed", s.IMAGE_BUILD_FAILED))
    async def on_image_build_failed(event: ImageBuildFailed, tx: Tx) -> None:
        detail = {"reason": event.reason, "attempts": event.attempts}
        await _project(tx, event.model, event.version, "build", "failed", detail, unless="built")

    @svc.consume(ValidationPassed, _spec("registry-validation-passed", s.VALIDATION_PASSED))
    async def on_validation_passed(event: ValidationPassed, tx: Tx) -> None:
        detail = {
            "metrics": event.metrics,
            "validated_tag": event.validated_tag,
            "report_id": str(event.report_id) if event.report_id else None,
            "digest": event.digest,
            "report": event.report,
        }
        if await _project(tx, event.model, event.version, "validation", "passed", detail):
            await tx.conn.execute(
                """INSERT INTO aliases (model, alias, version, updated_by)
                   SELECT $1, $2, $3, 'validator' FROM versions
                   WHERE model = $1 AND version = $3 AND stage NOT IN ('retired', 'archived')
                   ON CONFLICT (model, alias) DO UPDATE
                   SET version = EXCLUDED.version, updated_at = now(), updated_by = 'validator'""",
                event.model,
                CANDIDATE_ALIAS,
                event.version,
            )

    @svc.consume(ValidationFailed, _spec("registry-validation-failed", s.VALIDATION_FAILED))
    async def on_validation_failed(event: ValidationFailed, tx: Tx) -> None:
        detail = {
            "reasons": event.reasons,
            "metrics": event.metrics,
            "report_id": str(event.report_id) if event.report_id else None,
            "report": event.report,
        }
        await _project(tx, event.model, event.version, "validation", "failed", detail)

    @svc.consume(RetrainRequested, _spec("registry-retrain", s.RETRAIN_REQUESTED))
    async def on_retrain_requested(event: RetrainRequested, tx: Tx) -> None:
        known = await tx.conn.fetchval(
            "SELECT 1 FROM versions WHERE model = $1 AND version = $2",
            event.model,
            event.version,
        )
        if not known:
            # a request against nothing: dead-lettered, to replay once the version exists
            # (e.g. a registry restored from a backup older than the monitor's state)
            raise PermanentError(
                f"retrain requested for {event.model}@{event.version}, which is not registered"
            )
        await tx.conn.execute(
            """INSERT INTO retrain_requests
                   (request_id, model, version, alarm_id, reason, evidence, dataset)
               VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb)
               ON CONFLICT (request_id) DO NOTHING""",
            event.request_id,
            event.model,
            event.version,
            event.alarm_id,
            event.reason,
            json.dumps(event.evidence),
            event.dataset.model_dump_json(),
        )
