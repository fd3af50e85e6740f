"""The shadow (challenger) phase of a rollout.

A rollout with a ``shadow`` spec (``--shadow``, ``--shadow-first``, or its model's release
policy's ``shadow_first``) starts in state ``shadowing``: each targeted device that runs a
model keeps it and is given the version as its challenger (``DesiredModel.shadow``; the
agent runs it beside the champion on a sampled share of the same inputs, within its
budget, and sends both outputs to telemetry, acting on the champion's only). After the
phase's duration the monitor's comparison (``GET /v1/shadow`` of the rollout) decides:
at least ``min_compared`` inputs compared and an agreement of at least
``min_agreement`` pass. Then the challenger is taken off every device, and the rollout
ends ``shadow_passed`` (a shadow rollout), goes on to its waves (``then_waves``), or ends
``shadow_failed``: a failing challenger never gets a real wave.

Phases (``rollouts.shadow_state``): ``None`` → (challenger written, ``rollout.shadow.
started``) ``observing`` → (duration over, verdict stored) ``deciding`` → (challenger
removed, ``rollout.shadow.passed|failed``) ``passed`` | ``failed``. A phase whose
duration ended with fewer than ``min_compared`` inputs compared goes on observing (asking
the monitor every 2 s) for up to ``evidence_wait_seconds`` and is judged as soon as there
are enough: telemetry comes in windows, late from devices offline a while. Each transition
commits with its events; a deployer killed anywhere redoes at most the write of the same
documents (idempotent) or the removal.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from edgeloop.contracts.events import (
    Event,
    RolloutShadowFailed,
    RolloutShadowPassed,
    RolloutShadowStarted,
    ShadowSpec,
)
from edgeloop.contracts.twin import DesiredModel, ShadowModel
from edgeloop.deployer.store import Rollout
from edgeloop.deployer.twin import Twin

log = logging.getLogger(__name__)

#: The agent stops running a challenger this long after the phase should have ended (a
#: deployer that never comes back to remove it leaves no challenger running for good).
UNTIL_MARGIN = timedelta(minutes=10)

#: How a shadow step commits: rollout column updates, expected states, events.
Commit = Callable[[Rollout, dict[str, object], tuple[str, ...], Sequence[Event]], Awaitable[None]]


def judge(spec: ShadowSpec, overall: dict[str, Any]) -> tuple[bool, str]:
    """Whether the phase passes on the monitor's overall comparison, and why."""
    compared = int(overall.get("compared") or 0)
    agreement = overall.get("agreement")
    if compared < spec.min_compared or agreement is None:
        skipped = int(overall.get("skipped_budget") or 0)
        return False, (
            f"only {compared} inputs compared (at least {spec.min_compared} needed)"
            + (
                f"; {skipped} sampled inputs skipped over the challenger's budget"
                if skipped
                else ""
            )
        )
    if agreement < spec.min_agreement:
        return False, (
            f"the challenger agrees with the champion on {agreement:.1%} of {compared} inputs "
            f"(at least {spec.min_agreement:.1%} needed)"
        )
    return True, (
        f"the challenger agrees with the champion on {agreement:.1%} of {compared} inputs "
        f"(at least {spec.min_agreement:.1%} needed)"
    )


class ShadowPhase:
    """Drives rollouts in state ``shadowing`` (one step at a time, like the engine)."""

    def __init__(
        self,
        twin: Twin,
        report: Callable[[str, str, uuid.UUID], Awaitable[dict[str, Any]]],
        commit: Commit,
        *,
        tick: float,
    ) -> None:
        self.twin = twin
        self.report = report
        self.commit = commit
        self.tick = tick

    async def step(self, r: Rollout, devices: list[str]) -> float:
        """One step of ``r``'s phase (``devices``: the rollout's targets); the seconds
        until the next look."""
        if r.shadow_state is None:
            return await self._start(r, devices)
        if r.shadow_state == "observing":
            return await self._observe(r)
        if r.shadow_state == "deciding":
            return await self._finish(r)
        log.error("rollout %s: shadowing in phase %s", r.rollout_id, r.shadow_state)
        return self.tick

    async def _start(self, r: Rollout, devices: list[str]) -> float:
        spec = r.shadow
        assert spec is not None
        assert r.digest is not None
        current = await self.twin.get_desired(devices)
        longest = spec.duration_seconds + spec.evidence_wait_seconds
        until = datetime.now(UTC) + timedelta(seconds=longest) + UNTIL_MARGIN
        docs: dict[str, DesiredModel | None] = {}
        for device, raw in sorted(current.items()):
            doc = DesiredModel.from_bytes(raw) if raw else None
            if doc is None or doc.manifest_digest is None:
                continue  # runs nothing: no champion to compare with
            challenger = r.desired(
                ShadowModel, sample=spec.sample, max_overhead=spec.max_overhead, until=until
            )
            docs[device] = doc.model_copy(update={"shadow": challenger})
        if not docs:
            reason = (
                f"none of the {len(devices)} targeted devices runs a model to compare the "
                "challenger with"
            )
            await self.commit(
                r,
                {
                    "state": "shadow_failed",
                    "shadow_state": "failed",
                    "reason": f"shadow phase: {reason}",
                    "finished_at": datetime.now(UTC),
                },
                ("shadowing",),
                [_verdict(r, reason, None, 0, passed=False)],
            )
            return 0.0
        await self.twin.put_desired(docs)
        await self.commit(
            r,
            {
                "shadow_state": "observing",
                "shadow_started_at": datetime.now(UTC),
                "shadow_devices": _json(sorted(docs)),
            },
            ("shadowing",),
            [
                RolloutShadowStarted(
                    rollout_id=r.rollout_id,
                    model=r.model,
                    version=r.version,
                    devices=sorted(docs),
                    spec=spec,
                )
            ],
        )
        log.info(
            "rollout %s: challenger %s@%s given to %d devices for %g s (sample %g)",
            r.rollout_id,
            r.model,
            r.version,
            len(docs),
            spec.duration_seconds,
            spec.sample,
        )
        return 0.0

    async def _observe(self, r: Rollout) -> float:
        spec = r.shadow
        assert spec is not None
        started = r.shadow_started_at or datetime.now(UTC)
        left = spec.duration_seconds - (datetime.now(UTC) - started).total_seconds()
        if left > 0:
            return min(self.tick * 4, left)
        try:
            report = await self.report(r.model, r.version, r.rollout_id)
        except httpx.HTTPError as exc:  # the monitor's fault, not the challenger's: ask again
            log.warning("rollout %s: cannot ask the monitor (retrying): %s", r.rollout_id, exc)
            return 2.0
        overall = dict(report.get("overall") or {})
        passed, reason = judge(spec, overall)
        short = int(overall.get("compared") or 0) < spec.min_compared
        if short and -left < spec.evidence_wait_seconds:
            # too little evidence yet (telemetry comes in windows): look again shortly
            return min(2.0, spec.evidence_wait_seconds + left)
        result = {
            "verdict": "passed" if passed else "failed",
            "reason": reason,
            "agreement": overall.get("agreement"),
            "compared": int(overall.get("compared") or 0),
            "report": report,
        }
        await self.commit(
            r, {"shadow_state": "deciding", "shadow_result": _json(result)}, ("shadowing",), []
        )
        return 0.0

    async def _finish(self, r: Rollout) -> float:
        """Take the challenger off every device given it, then end the phase."""
        spec = r.shadow
        result = r.shadow_result or {}
        assert spec is not None
        devices = r.shadow_devices or []
        current = await self.twin.get_desired(devices)
        docs: dict[str, DesiredModel | None] = {}
        for device, raw in current.items():
            doc = DesiredModel.from_bytes(raw) if raw else None
            if doc is not None and doc.shadow is not None and doc.shadow.rollout_id == r.rollout_id:
                docs[device] = doc.model_copy(update={"shadow": None})
        await self.twin.put_desired(docs)
        passed = result.get("verdict") == "passed"
        reason = str(result.get("reason") or "")
        agreement = result.get("agreement")
        compared = int(result.get("compared") or 0)
        now = datetime.now(UTC)
        if passed:
            update: dict[str, object] = {"shadow_state": "passed"}
            if not spec.then_waves:
                update |= {"state": "shadow_passed", "finished_at": now}
            else:
                update |= {"state": "running"}
        else:
            update = {
                "shadow_state": "failed",
                "state": "shadow_failed",
                "finished_at": now,
                "reason": f"shadow phase: {reason}",
            }
        event = _verdict(r, reason, agreement, compared, passed=passed)
        await self.commit(r, update, ("shadowing",), [event])
        log.info("rollout %s: shadow phase %s: %s", r.rollout_id, result.get("verdict"), reason)
        return 0.0


def _verdict(
    r: Rollout, reason: str, agreement: float | None, compared: int, *, passed: bool
) -> Event:
    kind = RolloutShadowPassed if passed else RolloutShadowFailed
    return kind(
        rollout_id=r.rollout_id,
        model=r.model,
        version=r.version,
        agreement=agreement,
        compared=compared,
        reason=reason,
    )


def _json(value: Any) -> str:
    return json.dumps(value)
