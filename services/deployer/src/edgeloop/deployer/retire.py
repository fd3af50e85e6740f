"""Retiring a model version (``POST /v1/retirements``, ``edgeloop models retire``).

A version still running on devices is not retired: the request is refused naming them,
unless it names a replacement, which is rolled out to exactly those devices (a rollout
with an explicit device list); once that rollout completes and no device runs the
version any more, the registry retires it. A replacement rollout that rolls back, is
aborted or refused leaves the version deprecated, with the reason.

Each retirement is a row (``retirements``) driven by :meth:`Retirements.advance`: at the
request, then by a sweep every few seconds, under ``FOR UPDATE SKIP LOCKED`` (replicas
share the work). Each state implies one registry call (replacing and failed: deprecate
with the reason; retiring: retire), repeated until it succeeded (``synced``) — every such
call is idempotent — so a deployer or registry restarted anywhere resumes the retirement,
and a retried request (same ``retirement_id``, or the same version while one is under
way) finds the one it started instead of starting a second rollout.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from pydantic import Field

from edgeloop.contracts.events import RolloutRequested
from edgeloop.deployer.admission import Admission
from edgeloop.deployer.plan import RolloutKnobs
from edgeloop.deployer.sources import Devices, Refused, Registry
from edgeloop.deployer.store import TERMINAL, Store
from edgeloop.kit import audit

log = logging.getLogger(__name__)

#: Replacement rollouts' ids derive from their retirement's, so nothing can start two.
_NAMESPACE = uuid.UUID("0b7f6d0e-5c7a-4f53-a3c5-8d1d7f3b9e21")

#: Device ids named in a message, at most.
SHOWN = 5


class RetireRequest(RolloutKnobs):
    """Body of ``POST /v1/retirements``; the rollout fields shape the replacement rollout."""

    model: str = Field(min_length=1)
    version: str = Field(min_length=1)
    reason: str | None = Field(default=None, max_length=2000)
    replace_with: str | None = Field(
        default=None, description="NAME@VERSION the devices running the version move to"
    )
    retirement_id: uuid.UUID | None = Field(
        default=None, description="the client's id for this request: a retry finds it"
    )


def _shown(devices: list[str]) -> str:
    more = f" and {len(devices) - SHOWN} more" if len(devices) > SHOWN else ""
    return ", ".join(devices[:SHOWN]) + more


def _ref(text: str) -> tuple[str, str]:
    name, _, version = text.partition("@")
    if not name or not version:
        raise Refused(422, f"--replace-with needs NAME@VERSION, got {text!r}")
    return name, version


class Retirements:
    """Starts and drives retirements."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        schema: str,
        admission: Admission,
        wake: Callable[[uuid.UUID | None], None],
    ) -> None:
        self.pool = pool
        self.schema = schema
        self.admission = admission
        self.registry: Registry = admission.registry
        self.devices: Devices = admission.devices
        self.store = Store()
        self.wake = wake

    async def request(self, req: RetireRequest, who: str) -> tuple[dict[str, Any], bool]:
        """Start retiring (``Refused`` with the reason when it cannot start); the
        retirement after its first step, and whether this request started it."""
        rid = req.retirement_id or uuid.uuid4()
        async with self.pool().acquire() as conn:
            existing = await self.store.retirement(conn, rid)
        if existing is not None:
            return existing, False
        ref = f"{req.model}@{req.version}"
        record = await self.registry.version(req.model, req.version)
        if record.get("stage") in ("retired", "archived"):
            raise Refused(409, f"{ref} is already {record['stage']}")
        replacement = _ref(req.replace_with) if req.replace_with else None
        if replacement == (req.model, req.version):
            raise Refused(422, f"{ref} cannot replace itself")
        running = await self.devices.running(req.model, req.version)
        if running and replacement is None:
            raise Refused(
                409,
                f"{ref} still runs on {len(running)} device(s): {_shown(running)}; retire it "
                "with --replace-with NAME@VERSION to move them to another version first",
            )
        async with self.pool().acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"retire:{ref}")
            under_way = await self.store.open_retirement(conn, req.model, req.version)
            if under_way is not None:
                row = await self.store.retirement(conn, under_way)
                assert row is not None
                if (row["replace_model"], row["replace_version"]) == (replacement or (None, None)):
                    return row, False
                raise Refused(409, f"retirement {under_way} of {ref} is under way")
            busy = await self.store.active_rollout_of(conn, req.model, req.version)
            if busy is not None:
                raise Refused(
                    409, f"rollout {busy} of {ref} is still running; let it end or abort it first"
                )
            rollout = None
            if running and replacement is not None:
                rollout = RolloutRequested(
                    rollout_id=uuid.uuid5(_NAMESPACE, str(rid)),
                    model=replacement[0],
                    version=replacement[1],
                    selector={},
                    devices=running,
                    requested_by=who,
                    **req.knobs(),
                )
                await self.admission.admit_and_queue(conn, self.schema, rollout)
            await self.store.insert_retirement(
                conn,
                retirement_id=rid,
                model=req.model,
                version=req.version,
                reason=req.reason,
                requested_by=who,
                replace_model=replacement[0] if replacement else None,
                replace_version=replacement[1] if replacement else None,
                rollout_id=rollout.rollout_id if rollout else None,
                devices=running,
                state="replacing" if rollout else "retiring",
            )
            await audit.record(
                conn,
                service="deployer",
                actor=who,
                action="retirement.start",
                subject=f"retirement {rid}",
                model=req.model,
                version=req.version,
                after={
                    "retirement_id": str(rid),
                    "replace_with": req.replace_with,
                    "rollout_id": str(rollout.rollout_id) if rollout else None,
                    "devices": len(running),
                },
                reason=req.reason,
            )
        if rollout is not None:
            self.wake(None)
        try:
            await self.advance(rid)
        except (httpx.HTTPError, OSError, asyncpg.PostgresError) as exc:
            log.warning("retirement %s: first step failed, the sweep goes on: %s", rid, exc)
        async with self.pool().acquire() as conn:
            row = await self.store.retirement(conn, rid)
        assert row is not None
        return row, True

    async def sweep(self) -> None:
        """Advance every retirement with something left to do."""
        async with self.pool().acquire() as conn:
            pending = await self.store.pending_retirements(conn)
        for rid in pending:
            try:
                await self.advance(rid)
            except (httpx.HTTPError, OSError) as exc:
                log.warning("retirement %s: will try again: %s", rid, exc)

    async def advance(self, rid: uuid.UUID) -> None:
        """Take the retirement one step (under its row lock; another replica holding it
        does it instead): follow the replacement rollout, and make the registry's stage
        what the state implies."""
        async with self.pool().acquire() as conn, conn.transaction():
            t = await self.store.retirement(conn, rid, lock=True)
            if t is None:
                return
            changes = await self._step(t)
            if changes:
                await self.store.set_retirement(conn, rid, **changes)

    async def _step(self, t: dict[str, Any]) -> dict[str, Any]:
        ref = f"{t['model']}@{t['version']}"
        state, synced, detail = t["state"], t["synced"], t["detail"]
        if state == "replacing" and t["rollout_state"] in TERMINAL:
            synced = False
            if t["rollout_state"] == "completed":
                state = "retiring"
            else:
                state = "failed"
                detail = (
                    f"the replacement rollout {t['rollout_id']} {t['rollout_state']}: "
                    f"{t['rollout_reason'] or 'no reason given'}"
                )
        if not synced and state == "retiring":
            still = await self.devices.running(t["model"], t["version"])
            if still:
                state = "failed"
                detail = f"{len(still)} device(s) still run {ref}: {_shown(still)}"
            else:
                replaced = (
                    f"{t['replace_model']}@{t['replace_version']}" if t["replace_model"] else None
                )
                try:
                    await self.registry.set_stage(
                        t["model"],
                        t["version"],
                        "retire",
                        reason=t["reason"],
                        retirement_id=str(t["retirement_id"]),
                        requested_by=t["requested_by"],
                        replaced_by=replaced,
                    )
                    state, synced = "retired", True
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code >= 500:
                        raise
                    state, detail = "failed", f"the registry refused: {exc.response.text}"
        if not synced and state in ("replacing", "failed"):
            why = (
                f"being retired: its devices move to {t['replace_model']}@"
                f"{t['replace_version']} (rollout {t['rollout_id']})"
                if state == "replacing"
                else f"not retired ({detail}); it stays deprecated"
            )
            if t["reason"]:
                why += f"; retirement reason: {t['reason']}"
            try:
                await self.registry.set_stage(t["model"], t["version"], "deprecate", reason=why)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code >= 500:
                    raise
                log.warning("retirement %s: the registry refused %s: %s", ref, why, exc)
            synced = True
        changes: dict[str, Any] = {}
        if (state, synced, detail) != (t["state"], t["synced"], t["detail"]):
            changes = {"state": state, "synced": synced, "detail": detail}
            if state in ("retired", "failed") and t["finished_at"] is None:
                changes["finished_at"] = datetime.now(UTC)
            log.info("retirement of %s: %s%s", ref, state, f" ({detail})" if detail else "")
        return changes
