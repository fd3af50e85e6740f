"""Events the deployer consumes: rollout requests from the bus (the closed loop, or any
publisher), validated versions (rolled out by their model's release policy) and the
monitor's canary verdicts."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable

import httpx

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import CanaryVerdict, RolloutRequested, ValidationPassed
from edgeloop.deployer.admission import Admission
from edgeloop.deployer.plan import DEFAULT_WAVES
from edgeloop.deployer.policy import load_policy
from edgeloop.deployer.sources import NotYet, Refused
from edgeloop.deployer.store import Store
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.consumer import Tx
from edgeloop.kit.service import Service

log = logging.getLogger(__name__)


def register_handlers(
    svc: Service,
    admission: Admission,
    wake: Callable[[uuid.UUID | None], None],
    *,
    max_attempts: int,
    backoff: tuple[float, ...],
) -> None:
    """Subscribe the deployer's consumers."""
    store = Store()

    def admitting(durable: str, subject: str) -> ConsumerSpec:
        """One event per transaction (an admission asks other services), retried with
        back-off while they are unreachable or the version is still being validated."""
        return ConsumerSpec(
            stream=s.STREAM_LIFECYCLE,
            durable=durable,
            filter_subjects=(subject,),
            max_deliver=max_attempts + 1,
            backoff=backoff,
            batch_size=1,
        )

    @svc.consume(RolloutRequested, admitting(s.CONSUMER_DEPLOYER, s.ROLLOUT_REQUESTED))
    async def on_rollout_requested(event: RolloutRequested, tx: Tx) -> None:
        await admit(event, tx)

    @svc.consume(ValidationPassed, admitting(s.CONSUMER_DEPLOYER_RELEASES, s.VALIDATION_PASSED))
    async def on_validation_passed(event: ValidationPassed, tx: Tx) -> None:
        policy = await load_policy(tx.conn, event.model)
        if policy is None or not policy.auto_rollout or policy.check():
            return
        req = policy.request(event, DEFAULT_WAVES)
        log.info(
            "%s@%s validated: its release policy rolls it out to %s (rollout %s)",
            event.model,
            event.version,
            req.selector,
            req.rollout_id,
        )
        if await admit(req, tx):
            await tx.publish(req)

    async def admit(event: RolloutRequested, tx: Tx) -> bool:
        """Admit (or refuse) the request; whether it is new."""
        if await store.find(tx.conn, event.rollout_id) is not None:
            return False  # admitted through the API (its own request coming back), or seen
        try:
            await admission.admit(tx.conn, event)
        except NotYet as exc:
            if tx.deliveries < max_attempts:
                raise  # validation still running: ask again after the back-off
            await admission.refuse(tx.conn, event, exc.reason, tx.publish)
        except Refused as exc:
            await admission.refuse(tx.conn, event, exc.reason, tx.publish)
        except httpx.HTTPError as exc:
            if tx.deliveries < max_attempts:
                raise
            await admission.refuse(
                tx.conn,
                event,
                f"could not reach the registry or the gateway after {tx.deliveries} "
                f"attempts: {type(exc).__name__}: {exc}",
                tx.publish,
            )
        tx.after_commit(lambda: wake(None))
        return True

    @svc.consume(
        CanaryVerdict,
        ConsumerSpec(
            stream=s.STREAM_LIFECYCLE,
            durable=s.CONSUMER_DEPLOYER_VERDICTS,
            filter_subjects=(s.ROLLOUT_CANARY_VERDICT,),
        ),
    )
    async def on_canary_verdict(event: CanaryVerdict, tx: Tx) -> None:
        status = await tx.conn.execute(
            """UPDATE waves SET verdict = $3, verdict_reasons = $4::jsonb
               WHERE rollout_id = $1 AND wave = $2 AND state IN ('writing', 'converging', 'baking')
                 AND verdict IS DISTINCT FROM 'fail'""",
            event.rollout_id,
            event.wave,
            event.verdict.value,
            json.dumps(event.reasons),
        )
        if status == "UPDATE 0":
            log.info(
                "verdict %s for rollout %s wave %d ignored: the wave is not in progress",
                event.verdict.value,
                event.rollout_id,
                event.wave,
            )
            return
        log.info(
            "rollout %s wave %d: canary verdict %s %s",
            event.rollout_id,
            event.wave,
            event.verdict.value,
            event.reasons,
        )
        tx.after_commit(lambda: wake(event.rollout_id))
