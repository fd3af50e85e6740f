"""The deployer's HTTP API: start rollouts, look at them, pause, resume, abort, roll back,
approve; and each model's release policy.

Starting a rollout admits it at once (validated image, matching devices, no overlap) and
answers with its id and plan; a refusal is a 4xx whose message says why. The request
goes on the bus as ``rollout.requested`` through the outbox, in the same transaction.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI, HTTPException, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from edgeloop.contracts.events import (
    Event,
    RolloutAborted,
    RolloutApproved,
    RolloutPaused,
    RolloutRequested,
    RolloutResumed,
    ShadowSpec,
)
from edgeloop.contracts.names import check_labels, check_model, check_version
from edgeloop.deployer.admission import Admission
from edgeloop.deployer.plan import (
    Reported,
    RolloutKnobs,
    deferral,
    disruption_cap,
    failure_budget,
    progress,
    straggler_status,
)
from edgeloop.deployer.policy import ReleasePolicy, load_policy, save_policy
from edgeloop.deployer.retire import Retirements, RetireRequest
from edgeloop.deployer.sources import Refused
from edgeloop.deployer.store import ACTIVE, Rollout, Store, Wave
from edgeloop.deployer.twin import Twin
from edgeloop.kit import audit
from edgeloop.kit.api import Actor, Operator, new_api
from edgeloop.kit.outbox import add_event


class StartBody(RolloutKnobs):
    """Body of ``POST /v1/rollouts``."""

    model: str = Field(min_length=1)
    version: str = Field(min_length=1)
    digest: str | None = None
    selector: dict[str, str]
    devices: list[str] | None = Field(
        default=None, description="exactly these devices (that match the selector, may be {})"
    )
    shadow: ShadowSpec | None = Field(
        default=None,
        description="a shadow phase: the devices run the version beside their model, never "
        "acting on it, and it passes on agreement (then_waves: its waves follow a pass)",
    )


class ActionBody(BaseModel):
    """Body of the operator actions (optional)."""

    reason: str | None = Field(default=None, max_length=2000)


def create_api(
    pool: Callable[[], asyncpg.Pool],
    schema: str,
    admission: Admission,
    twin: Twin,
    wake: Callable[[uuid.UUID | None], None],
    tokens: frozenset[str],
    retirements: Retirements,
) -> FastAPI:
    """The FastAPI app (OpenAPI at ``/docs``)."""
    api = new_api(
        title="edgeloop deployer",
        version="1",
        description="Canary rollouts of validated model images to device groups.",
    )
    api.state.tokens = tokens
    api.state.pool = pool
    store = Store()

    @contextlib.asynccontextmanager
    async def refusals(what: str) -> AsyncIterator[None]:
        """``Refused`` as its HTTP status; an unreachable registry or gateway as 503."""
        try:
            yield
        except Refused as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        except httpx.HTTPError as exc:
            raise HTTPException(
                503, f"cannot reach the registry or the gateway to {what}: {exc}"
            ) from exc

    @api.post("/v1/rollouts", status_code=201)
    async def start(body: StartBody, who: Operator) -> dict[str, Any]:
        """Admit a rollout and start it; 4xx with the reason when it cannot start."""
        check_model(body.model)  # InvalidName: 422 stating the rule
        check_version(body.version)
        check_labels(body.selector)
        req = RolloutRequested(rollout_id=uuid.uuid4(), requested_by=who, **body.model_dump())
        async with refusals("admit the rollout"), pool().acquire() as conn, conn.transaction():
            await admission.admit_and_queue(conn, schema, req)
        wake(None)
        return await _show(req.rollout_id)

    @api.post("/v1/retirements")
    async def retire(body: RetireRequest, who: Operator) -> JSONResponse:
        """Retire a version: refused while devices run it, unless ``replace_with`` names
        the version a rollout moves them to first (201: started; 200: the retirement this
        request's ``retirement_id``, or one under way for the version, already is)."""
        async with refusals("retire the version"):
            row, created = await retirements.request(body, who)
        return JSONResponse(jsonable_encoder(row), status_code=201 if created else 200)

    @api.get("/v1/retirements")
    async def list_retirements(
        _: Actor, model: str | None = None, limit: int = Query(50, ge=1, le=1000)
    ) -> dict[str, Any]:
        """Retirements, newest first."""
        async with pool().acquire() as conn:
            return {"retirements": await store.retirements(conn, model, limit)}

    @api.get("/v1/retirements/{retirement_id}")
    async def show_retirement(retirement_id: uuid.UUID, _: Actor) -> dict[str, Any]:
        """One retirement: its state, its replacement rollout's, and why it failed."""
        async with pool().acquire() as conn:
            row = await store.retirement(conn, retirement_id)
        if row is None:
            raise HTTPException(404, f"no retirement {retirement_id}")
        return row

    @api.get("/v1/rollouts")
    async def list_rollouts(
        _: Actor,
        state: str | None = Query(None, description="comma-separated states, or 'active'"),
        model: str | None = None,
        limit: int = Query(50, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Rollouts, newest first."""
        states = None
        if state:
            states = list(ACTIVE) if state == "active" else [s.strip() for s in state.split(",")]
        async with pool().acquire() as conn:
            rows = await store.recent(conn, states=states, model=model, limit=limit)
            out = []
            for r in rows:
                waves = await store.waves(conn, r.rollout_id)
                out.append({**r.as_dict(), "waves_planned": [w.size for w in waves]})
        return {"rollouts": out}

    async def _show(rollout_id: uuid.UUID, devices: bool = False) -> dict[str, Any]:
        async with pool().acquire() as conn:
            r = await store.find(conn, rollout_id)
            if r is None:
                raise HTTPException(404, f"no rollout {rollout_id}")
            waves = await store.waves(conn, rollout_id)
            plan = await store.devices(conn, rollout_id)
        now = datetime.now(UTC)
        by_wave = {w.wave: w for w in waves}
        out = r.as_dict()
        out["waves_planned"] = [w.size for w in waves]
        out["wave_status"] = []
        for w in waves:
            item = w.as_dict()
            if w.state in ("writing", "converging", "baking") and r.digest:
                members = [
                    d["device_id"] for d in plan if d["wave"] == w.wave and not d["straggler"]
                ]
                p = progress(members, r.digest, twin.reported)
                item["live"] = {
                    "converged": len(p.converged),
                    "failed": len(p.failed),
                    "pending": len(p.pending),
                }
            judged = w.size if w.members is None else w.members
            item["budget"] = failure_budget(judged, r.max_failures, r.max_failures_percent)
            cap = disruption_cap(judged, r.max_unavailable, r.max_unavailable_percent)
            item["max_unavailable"] = cap
            if cap is not None and w.state == "converging" and r.digest:
                item["waiting"] = _budget_wait(r, plan, w, cap, twin.reported, now)
            out["wave_status"].append(item)
        out["waiting"] = _window_wait(r)
        out["devices"] = len(plan)
        for d in plan:
            d["status"], d["status_text"] = device_status(
                r, d, by_wave[d["wave"]], twin.reported.get(d["device_id"]), now
            )
        out["deferred"] = [
            {
                "device_id": d["device_id"],
                "wave": d["wave"],
                "text": d["status_text"],
                "since": _iso(reported.deferred_since),
                "deadline_at": _iso(reported.deferred_until),
            }
            for d in plan
            if d["status"] == "deferred" and (reported := twin.reported.get(d["device_id"]))
        ]
        stragglers = [d for d in plan if d["straggler"]]
        out["stragglers"] = [
            {
                "device_id": d["device_id"],
                "wave": d["wave"],
                "status": d["status"],
                "text": d["status_text"],
                "absent": d["absent"],
                "offline_since": d["offline_since"],
                "deadline_at": _deadline(r, by_wave[d["wave"]]),
            }
            for d in stragglers
        ]
        out["straggler_counts"] = dict(Counter(d["status"] for d in stragglers))
        if devices:
            out["device_plan"] = plan
        return out

    @api.get("/v1/rollouts/{rollout_id}")
    async def show(rollout_id: uuid.UUID, _: Actor, devices: bool = False) -> dict[str, Any]:
        """One rollout, its waves with live progress, its stragglers (given the release
        while offline or unhealthy: pending, stale, converged or failed), and
        (``devices=true``) its plan with each device's status."""
        return await _show(rollout_id, devices)

    @api.get("/v1/devices/{device_id}/rollouts")
    async def device_rollouts(
        device_id: str, _: Actor, limit: int = Query(5, ge=1, le=100)
    ) -> dict[str, Any]:
        """The rollouts that reach a device, newest first, with where the device is in
        each (its wave and status: ``pending (offline since …)``, ``stale``, …)."""
        now = datetime.now(UTC)
        out = []
        async with pool().acquire() as conn:
            for r, d in await store.device_rollouts(conn, device_id, limit):
                wave = await store.wave(conn, r.rollout_id, d["wave"])
                status, text = device_status(r, d, wave, twin.reported.get(device_id), now)
                out.append(
                    {
                        "rollout_id": str(r.rollout_id),
                        "model": r.model,
                        "version": r.version,
                        "state": r.state,
                        "created_at": r.created_at.isoformat(),
                        "wave": d["wave"],
                        "straggler": d["straggler"],
                        "status": status,
                        "status_text": text,
                        "deadline_at": _deadline(r, wave) if d["straggler"] else None,
                    }
                )
        return {"device_id": device_id, "rollouts": out}

    async def act(
        rollout_id: uuid.UUID,
        allowed: tuple[str, ...],
        verb: str,
        update: dict[str, Any],
        event: Callable[[Any], Event | None],
        *,
        actor: str,
        action: str,
        reason: str | None = None,
        close_wave: str | None = None,
        restart_clock: bool = False,
    ) -> dict[str, Any]:
        async with pool().acquire() as conn, conn.transaction():
            try:
                r = await store.rollout(conn, rollout_id, lock=True)
            except KeyError:
                raise HTTPException(404, f"no rollout {rollout_id}") from None
            if r.state not in allowed:
                raise HTTPException(
                    409,
                    f"rollout {rollout_id} is {r.state}; only a rollout that is "
                    f"{' or '.join(allowed)} can be {verb}",
                )
            await store.set_rollout(conn, rollout_id, expect=allowed, **update)
            current = [w for w in await store.waves(conn, rollout_id) if w.wave == r.current_wave]
            wave_state = current[0].state if current else None
            if close_wave and wave_state in ("writing", "converging", "baking"):
                await store.set_wave(
                    conn,
                    rollout_id,
                    r.current_wave,
                    expect=wave_state,
                    state=close_wave,
                    reason=update.get("reason"),
                )
            if restart_clock and wave_state in ("converging", "baking"):
                await conn.execute(
                    "UPDATE waves SET phase_since = now() WHERE rollout_id = $1 AND wave = $2",
                    rollout_id,
                    r.current_wave,
                )
            e = event(r)
            if e is not None:
                await add_event(conn, schema, e)
            await audit.record(
                conn,
                service="deployer",
                actor=str(actor),
                action=f"rollout.{action}",
                subject=f"rollout {rollout_id}",
                model=r.model,
                version=r.version,
                before={"state": r.state},
                after={k: v for k, v in update.items() if k in ("state", "reason")},
                reason=reason,
            )
        wake(rollout_id)
        wake(None)
        return await _show(rollout_id)

    @api.post("/v1/rollouts/{rollout_id}/pause")
    async def pause(rollout_id: uuid.UUID, who: Operator, body: ActionBody | None = None) -> Any:
        """Hold the rollout where it is (the current wave is not promoted)."""
        return await act(
            rollout_id,
            ("running", "pending", "waiting_for_window"),
            "paused",
            {"state": "paused"},
            lambda r: RolloutPaused(
                rollout_id=r.rollout_id, model=r.model, version=r.version, actor=who
            ),
            actor=who,
            action="pause",
            reason=body.reason if body else None,
        )

    @api.post("/v1/rollouts/{rollout_id}/resume")
    async def resume(rollout_id: uuid.UUID, who: Operator, body: ActionBody | None = None) -> Any:
        """Go on from where it was paused (the current wave's clock starts again)."""
        return await act(
            rollout_id,
            ("paused",),
            "resumed",
            {"state": "running"},
            lambda r: RolloutResumed(
                rollout_id=r.rollout_id, model=r.model, version=r.version, actor=who
            ),
            actor=who,
            action="resume",
            reason=body.reason if body else None,
            restart_clock=True,
        )

    @api.post("/v1/rollouts/{rollout_id}/abort")
    async def abort(rollout_id: uuid.UUID, who: Operator, body: ActionBody | None = None) -> Any:
        """Stop the rollout; devices keep what they have been given."""
        reason = (body.reason if body else None) or f"aborted by {who}"
        return await act(
            rollout_id,
            # a challenger left on devices by an aborted shadow phase stops at its `until`
            ("pending", "shadowing", "running", "paused", "waiting_for_window"),
            "aborted",
            {"state": "aborted", "reason": reason, "finished_at": datetime.now(UTC)},
            lambda r: RolloutAborted(
                rollout_id=r.rollout_id,
                model=r.model,
                version=r.version,
                actor=who,
                reason=reason,
            ),
            actor=who,
            action="abort",
            reason=reason,
            close_wave="aborted",
        )

    @api.post("/v1/rollouts/{rollout_id}/rollback")
    async def rollback(rollout_id: uuid.UUID, who: Operator, body: ActionBody | None = None) -> Any:
        """Give every device the rollout touched its previous desired state back."""
        reason = f"rolled back by {who}" + (f": {body.reason}" if body and body.reason else "")
        async with pool().acquire() as conn:
            r = await store.find(conn, rollout_id)
            if r is not None and r.state == "completed":
                later = await store.later_rollout(conn, r)
                if later is not None:
                    raise HTTPException(
                        409,
                        f"rollout {later} has changed devices of this rollout since; "
                        "roll that one back, or start a new rollout of the version you want",
                    )
        return await act(
            rollout_id,
            ("pending", "running", "paused", "waiting_for_window", "completed"),
            "rolled back",
            {"state": "rolling_back", "reason": reason, "rollback_by": who, "finished_at": None},
            lambda r: None,  # rollout.rolled_back goes out once the devices have it
            actor=who,
            action="rollback",
            reason=reason,
            close_wave="failed",
        )

    @api.post("/v1/rollouts/{rollout_id}/approve")
    async def approve(rollout_id: uuid.UUID, who: Operator, body: ActionBody | None = None) -> Any:
        """Let a rollout that waits at its release policy's gate go on (four eyes: not by
        the one who requested it)."""
        async with pool().acquire() as conn:
            r = await store.find(conn, rollout_id)
        if r is None:
            raise HTTPException(404, f"no rollout {rollout_id}")
        if r.approval_wave is None:
            raise HTTPException(
                409,
                f"rollout {rollout_id} needs no approval: {r.model}'s release policy has no gate",
            )
        if r.approved_by is not None:
            raise HTTPException(409, f"rollout {rollout_id} was approved by {r.approved_by}")
        if who == r.requested_by:
            raise HTTPException(
                403,
                f"you requested rollout {rollout_id}; its approval must come from someone else",
            )
        reason = body.reason if body else None
        return await act(
            rollout_id,
            ("awaiting_approval",),
            "approved",
            {
                "state": "running",
                "approved_by": who,
                "approved_at": datetime.now(UTC),
                "approval_reason": reason,
            },
            lambda r: RolloutApproved(
                rollout_id=r.rollout_id,
                model=r.model,
                version=r.version,
                wave=r.current_wave,
                actor=who,
                reason=reason,
            ),
            actor=who,
            action="approve",
            reason=reason,
        )

    @api.get("/v1/policies/{model}")
    async def show_policy(model: str, _: Actor) -> dict[str, Any]:
        """The model's release policy (the defaults when it has none)."""
        async with pool().acquire() as conn:
            policy = await load_policy(conn, model)
        return {
            "model": model,
            "defined": policy is not None,
            **(policy or ReleasePolicy()).model_dump(mode="json"),
        }

    @api.put("/v1/policies/{model}")
    async def set_policy(model: str, body: ReleasePolicy, who: Operator) -> dict[str, Any]:
        """Create or replace the model's release policy."""
        check_model(model)
        check_labels({**(body.selector or {}), **(body.approval_labels or {})})
        problem = body.check()
        if problem:
            raise HTTPException(422, problem)
        async with pool().acquire() as conn, conn.transaction():
            before = await load_policy(conn, model)
            await save_policy(conn, model, body, who)
            await audit.record(
                conn,
                service="deployer",
                actor=who,
                action="release_policy.set",
                subject=f"policy {model}",
                model=model,
                before=before.model_dump(mode="json") if before else None,
                after=body.model_dump(mode="json"),
            )
        return await show_policy(model, who)

    return api


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


def _window_wait(r: Rollout) -> dict[str, Any] | None:
    """A rollout outside its maintenance window: why it waits, and until when."""
    if r.state != "waiting_for_window":
        return None
    return {
        "for": "window",
        "reason": f"outside its maintenance window ({r.window_spec}): no desired state is "
        "written until it opens",
        "until": _iso(r.window_opens_at),
    }


def _budget_wait(
    r: Rollout,
    plan: list[dict[str, Any]],
    wave: Wave,
    cap: int,
    reported: dict[str, Reported],
    now: datetime,
) -> dict[str, Any] | None:
    """A wave under a disruption budget with devices not given the release yet: how many
    activate, how many wait, and the latest a slot frees (the earliest convergence
    timeout among those activating: by then it runs the release, failed, or is counted
    as failed and no longer holds its slot)."""
    assert r.digest is not None
    members = [d for d in plan if d["wave"] == wave.wave and not d["straggler"]]
    unwritten = [d["device_id"] for d in members if d["written_at"] is None]
    if not unwritten:
        return None
    written = {d["device_id"]: d["written_at"] for d in members if d["written_at"] is not None}
    p = progress(list(written), r.digest, reported)
    timeout = timedelta(seconds=r.converge_timeout_seconds)
    holding = [*p.pending, *p.deferred]  # deferred by an update lock: may start any moment
    ends = [written[d] + timeout for d in holding if written[d] + timeout > now]
    return {
        "for": "disruption budget",
        "reason": f"{_devices(len(unwritten))} waiting for the disruption budget: {len(ends)} "
        f"of at most {cap} given the release and not running it yet",
        "activating": len(ends),
        "waiting": len(unwritten),
        "until": _iso(min(ends)) if ends else None,
    }


def _devices(n: int) -> str:
    return f"{n} device" if n == 1 else f"{n} devices"


def _deadline(r: Rollout, wave: Wave) -> str | None:
    """When a straggler of ``wave`` turns stale."""
    if wave.started_at is None:
        return None
    return (wave.started_at + timedelta(seconds=r.device_deadline_seconds)).isoformat()


def device_status(
    r: Rollout, d: dict[str, Any], wave: Wave, reported: Reported | None, now: datetime
) -> tuple[str, str]:
    """Where one device of a rollout's plan is (``d``: its row of the plan): a short
    status and the words shown for it."""
    absent = d.get("absent")
    if d["straggler"] and r.state in ("rolling_back", "rolled_back"):
        return "rolled_back", f"rolled back (a straggler: {absent or 'offline'})"
    if d["straggler"] and r.digest and wave.started_at is not None:
        status = straggler_status(
            reported, r.digest, wave.started_at, r.device_deadline_seconds, now
        )
        if status in ("pending", "stale"):
            return status, f"{status} ({absent or 'offline'})"
        return status, f"{status} (a straggler: {absent or 'offline'} when its wave started)"
    if wave.state == "pending":
        passed = f"; passed over: {absent}" if absent else ""
        return "waiting", f"waits for wave {wave.wave}{passed}"
    live = wave.state in ("writing", "converging", "baking") or d.get("outcome") == "deferred"
    if live and r.digest and r.state not in ("rolling_back", "rolled_back", "aborted"):
        budgeted = r.max_unavailable is not None or r.max_unavailable_percent is not None
        if budgeted and wave.state in ("writing", "converging") and d["written_at"] is None:
            return "waiting", f"waits for the disruption budget (wave {wave.wave})"
        p = progress([d["device_id"]], r.digest, {d["device_id"]: reported} if reported else {})
        if p.deferred and reported is not None:
            return "deferred", deferral(reported)
        status = "converged" if p.converged else "failed" if p.failed else "pending"
        return status, f"{status} (wave {wave.wave}, {wave.state})"
    outcome = d.get("outcome") or "not reached"
    detail = f": {d['detail']}" if d.get("detail") else ""
    return outcome, f"{outcome} (wave {wave.wave}, {wave.state}){detail}"
