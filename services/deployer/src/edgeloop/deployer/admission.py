"""Admitting a rollout request: a validated image, devices that match, no overlap with a
running rollout, and a deterministic plan of waves — stored with the request in one
transaction."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from opentelemetry import trace
from opentelemetry.trace import Tracer

from edgeloop.contracts.events import Event, RolloutRefused, RolloutRequested
from edgeloop.deployer.plan import absence, no_canary, plan_waves
from edgeloop.deployer.policy import load_policy
from edgeloop.deployer.sources import Devices, Refused, Registry, ValidatedImage, presence_of
from edgeloop.deployer.store import Store
from edgeloop.kit import audit
from edgeloop.kit.db import Conn
from edgeloop.kit.outbox import add_event
from edgeloop.kit.tracing import inject_headers, parent_context

log = logging.getLogger(__name__)

Publish = Callable[[Event], Awaitable[None]]


class Admission:
    """Decides whether a rollout request may start, and records it."""

    def __init__(
        self,
        registry: Registry,
        devices: Devices,
        store: Store,
        tracer: Tracer | None = None,
        *,
        max_silence: float = 60.0,
    ) -> None:
        self.registry = registry
        self.devices = devices
        self.store = store
        self.tracer = tracer or trace.get_tracer("edgeloop.deployer")
        self.max_silence = max_silence
        """Seconds since its last message after which an online device counts as offline."""

    async def check(
        self, req: RolloutRequested
    ) -> tuple[ValidatedImage, list[list[str]], list[dict[str, str]]]:
        """The validated image, the plan and the labels of the devices it reaches, or
        ``Refused``/``NotYet`` (no DB work)."""
        image = await self.registry.validated_image(req.model, req.version)
        if req.digest and req.digest != image.digest:
            raise Refused(
                409,
                f"{req.model}@{req.version} was validated as {image.digest}, not {req.digest}",
            )
        if not req.selector and req.devices is None:
            raise Refused(422, "a rollout needs a device selector, e.g. --selector site=lab")
        text = ",".join(f"{k}={v}" for k, v in sorted(req.selector.items()))
        records = {d["device_id"]: d for d in await self.devices.enrolled(req.selector)}
        enrolled = {d: r["labels"] for d, r in records.items()}
        if req.devices is not None:
            unknown = sorted(set(req.devices) - set(enrolled))
            if unknown:
                raise Refused(
                    422,
                    f"{len(unknown)} of the devices named are not enrolled (or revoked)"
                    + (f" or do not match the selector {text}" if text else "")
                    + f": {', '.join(unknown[:5])}",
                )
            enrolled = {d: enrolled[d] for d in req.devices}
        if not enrolled:
            raise Refused(422, f"no enrolled device matches the selector {text}")
        # A canary nobody can run can never meet its budget: say so now, not at a timeout.
        now = datetime.now(UTC)
        absent = {
            d: a
            for d in sorted(enrolled)
            if (a := absence(presence_of(records[d]), now, self.max_silence)) is not None
        }
        if len(absent) == len(enrolled):
            whose = "devices named" if req.devices is not None else f"devices matching {text}"
            raise Refused(409, no_canary(absent, whose))
        plan = plan_waves(enrolled, req.waves)
        # gated by the labels of the devices it reaches, not by what the selector says
        return image, plan, list(enrolled.values())

    async def admit(self, conn: Conn, req: RolloutRequested) -> str | None:
        """Record the admitted rollout, in the caller's transaction; ``Refused`` when the
        devices overlap a running rollout or the request is inadmissible. Returns the
        rollout's ``traceparent``: a span in the version's trace (the caller's, when it
        is in one — the validation event's, for a release policy — else the version's
        registration), which every wave and device activation of the rollout joins."""
        image, plan, labels = await self.check(req)
        here = inject_headers().get("traceparent")
        with self.tracer.start_as_current_span(
            f"rollout {req.model}@{req.version}",
            context=parent_context(here or image.trace_parent),
            attributes={"edgeloop.rollout_id": str(req.rollout_id), "edgeloop.model": req.model},
        ):
            trace_parent = inject_headers().get("traceparent")
            await self._admit(conn, req, image, plan, labels, trace_parent)
        return trace_parent

    async def admit_and_queue(self, conn: Conn, schema: str, req: RolloutRequested) -> None:
        """:meth:`admit`, and queue ``rollout.requested`` in the same transaction (its
        coming back over the bus then finds the rollout and does nothing)."""
        trace_parent = await self.admit(conn, req)
        await add_event(
            conn, schema, req, headers={"traceparent": trace_parent} if trace_parent else None
        )

    async def _admit(
        self,
        conn: Conn,
        req: RolloutRequested,
        image: ValidatedImage,
        plan: list[list[str]],
        labels: list[dict[str, str]],
        trace_parent: str | None,
    ) -> None:
        # One admission at a time: the overlap check and the insert must not interleave.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('deployer:admission'))")
        devices = [d for wave in plan for d in wave]
        conflict = await self.store.conflicting(conn, devices)
        if conflict is not None:
            rollout_id, n = conflict
            raise Refused(
                409,
                f"{n} of the selected devices are in rollout {rollout_id}, which is still "
                "running; wait for it, or abort or roll it back first",
            )
        policy = await load_policy(conn, req.model)
        gate = policy.approval_wave(len(plan), req.selector, labels) if policy else None
        # the request's own shadow phase, else the one its model's policy requires first
        shadow = req.shadow or (policy.shadow_first if policy else None)
        await self.store.insert(
            conn,
            req,
            image=image.image,
            digest=image.digest,
            model_digest=image.model_digest,
            plan=plan,
            state="pending",
            trace_parent=trace_parent,
            approval_wave=gate,
            shadow=shadow,
        )
        await audit.record(
            conn,
            service="deployer",
            actor=req.requested_by or "unknown",
            action="rollout.start",
            subject=f"rollout {req.rollout_id}",
            model=req.model,
            version=req.version,
            after={
                "rollout_id": str(req.rollout_id),
                "image": image.image,
                "digest": image.digest,
                "selector": req.selector,
                "devices": req.devices,
                "waves": [len(w) for w in plan],
                "approval_wave": gate,
                "shadow": shadow.model_dump() if shadow else None,
            },
        )
        log.info(
            "rollout %s of %s@%s admitted: %d devices in waves of %s",
            req.rollout_id,
            req.model,
            req.version,
            len(devices),
            [len(w) for w in plan],
        )

    async def refuse(
        self, conn: Conn, req: RolloutRequested, reason: str, publish: Publish
    ) -> None:
        """Record a refused request (from the bus: nobody waits for an HTTP answer)."""
        await self.store.insert(
            conn,
            req,
            image=None,
            digest=None,
            model_digest=None,
            plan=[],
            state="refused",
            reason=reason,
        )
        await publish(
            RolloutRefused(
                rollout_id=req.rollout_id, model=req.model, version=req.version, reason=reason
            )
        )
        log.warning(
            "rollout %s of %s@%s refused: %s", req.rollout_id, req.model, req.version, reason
        )
