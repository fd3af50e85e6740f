"""The rollout engine: drives each active rollout through its waves.

Every step reads the rollout from PostgreSQL, acts, and commits the next state together
with the events it causes (outbox), so a deployer killed at any moment resumes where it
was: a wave whose ``wave.started`` committed is not started again; a wave whose desired
state was partly written is written again (the same documents, so no device changes
twice); a wave that succeeded is never repeated.

Wave: ``pending`` → (draw its devices, capture each one's previous desired state)
``writing`` → (desired state written) ``converging`` → (all devices run the image, or the
timeout with failures within budget) ``baking`` → (bake time without a failing verdict or
new failures) ``succeeded``; or ``failed``, which turns the rollout to ``rolling_back``:
every device the rollout touched gets its previous desired document back.

A wave draws its devices when it starts, online and healthy ones first (``plan.draw_wave``,
asking the gateway's device registry), and stores the draw in the transaction of its
``wave.started``, so a restarted deployer drives the same devices. Offline devices are
left for later waves; the last wave gives those still offline the release as stragglers,
which it neither waits for nor judges. A first wave with no device online fails at once;
a later one with nobody online left is ``skipped``.

A wave the model's release policy gates holds the rollout in ``awaiting_approval``
before it starts, until an operator other than the requester approves it.

A rollout with maintenance windows writes desired state only while one is open (the
engine's ``clock`` says when it is): outside them it waits in ``waiting_for_window`` with
the next opening stored. A rollout with a disruption budget (``max_unavailable``) gives a
wave's devices the release a few at a time: at most that many given it and neither
running it, nor failed, nor past their convergence timeout.

A replica owns the rollouts it drives through a lease (``owner``, ``lease_until``); every
transition checks it, so two replicas never drive one rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
from opentelemetry import trace
from opentelemetry.trace import Tracer
from prometheus_client import Counter, Gauge

from edgeloop.contracts.events import (
    Event,
    RolloutApprovalRequested,
    RolloutCompleted,
    RolloutRolledBack,
    RolloutWaveFailed,
    RolloutWaveStarted,
    RolloutWaveSucceeded,
)
from edgeloop.contracts.twin import DesiredModel
from edgeloop.contracts.windows import parse_window
from edgeloop.deployer.plan import (
    Absence,
    Draw,
    Progress,
    absence,
    disruption_cap,
    draw_wave,
    failure_budget,
    named_absent,
    no_canary,
    progress,
    wave_target,
)
from edgeloop.deployer.shadow import ShadowPhase
from edgeloop.deployer.sources import Devices, Monitor
from edgeloop.deployer.store import TERMINAL, Rollout, Store, Wave
from edgeloop.deployer.twin import Twin
from edgeloop.kit.db import TRANSIENT_DB_ERRORS
from edgeloop.kit.outbox import add_event
from edgeloop.kit.tracing import parent_context

log = logging.getLogger(__name__)

WAVES = Counter("edgeloop_deployer_waves_total", "Waves finished", ["outcome"])
ROLLOUTS = Counter("edgeloop_deployer_rollouts_total", "Rollouts finished", ["outcome"])
DRIVEN = Gauge("edgeloop_deployer_rollouts_driven", "Active rollouts this replica drives")
# Every outcome exported from the start (at 0): Prometheus's increase() sees a series that
# first appears at 1 as no increase, so the first rollback would not fire an alert.
for _outcome in ("succeeded", "failed"):
    WAVES.labels(_outcome)
for _outcome in ("completed", "rolled_back"):
    ROLLOUTS.labels(_outcome)

#: How many failing devices a wave event or a reason names (the rest are counted).
NAMED = 10

#: Seconds between two questions to the gateway from a wave that cannot start yet.
ASK_EVERY = 2.0

#: What a starting wave stores: its draw, the devices of its share it leaves for the next
#: wave, and why each device passed over was (the words shown, offline since when).
Drawn = tuple[Draw, list[str], dict[str, tuple[str, datetime | None]]]


class LostOwnership(Exception):
    """Another replica (or an operator) changed the rollout under us: re-read it."""


class Engine:
    """Claims active rollouts and drives each in its own task."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        twin: Twin,
        devices: Devices,
        *,
        owner: str,
        lease_seconds: float = 15.0,
        tick: float = 0.5,
        max_silence: float = 60.0,
        offline_grace: float = 60.0,
        tracer: Tracer | None = None,
        clock: Callable[[], datetime] | None = None,
        monitor: Monitor | None = None,
    ) -> None:
        self.tracer = tracer or trace.get_tracer("edgeloop.deployer")
        self.clock = clock or _now
        """The wall clock maintenance windows are judged by (tests move it)."""
        self.pool = pool
        self.schema = schema
        self.twin = twin
        self.devices = devices
        self.max_silence = max_silence
        self.offline_grace = offline_grace
        self.store = Store()
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.tick = tick
        self.drivers: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._wake: dict[uuid.UUID, asyncio.Event] = {}
        self._claim_now = asyncio.Event()
        self._devices: dict[tuple[uuid.UUID, int], tuple[list[str], list[str]]] = {}
        self._ask_after: dict[tuple[uuid.UUID, int], float] = {}
        """When a starting wave may ask the gateway again (monotonic time)."""
        self._rewritten: set[tuple[uuid.UUID, int]] = set()
        """Waves whose written devices this process has written again since it started."""
        self.monitor = monitor
        self.shadow = ShadowPhase(twin, self._shadow_report, self._shadow_commit, tick=tick)

    # --- scheduling ---------------------------------------------------------------------

    def wake(self, rollout_id: uuid.UUID | None = None) -> None:
        """Look at ``rollout_id`` (or claim new rollouts) now rather than at the next tick."""
        if rollout_id is not None and rollout_id in self._wake:
            self._wake[rollout_id].set()
        else:
            self._claim_now.set()

    async def run(self) -> None:
        """Claim and renew rollouts until cancelled; one driver task per rollout."""
        wakeups = asyncio.create_task(self._fan_out_changes(), name="deployer-wakeups")
        try:
            while True:
                try:
                    async with self.pool.acquire() as conn:
                        claimed = set(await self.store.claim(conn, self.owner, self.lease_seconds))
                except TRANSIENT_DB_ERRORS as exc:
                    log.warning("cannot claim rollouts (retrying): %s", exc)
                    claimed = set(self.drivers)
                for rid in claimed - set(self.drivers):
                    self._wake[rid] = asyncio.Event()
                    self.drivers[rid] = asyncio.create_task(self._drive(rid), name=f"rollout-{rid}")
                for rid in set(self.drivers) - claimed:
                    self.drivers.pop(rid).cancel()  # lost the lease: another replica drives it
                    self._wake.pop(rid, None)
                DRIVEN.set(len(self.drivers))
                self._claim_now.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._claim_now.wait(), self.lease_seconds / 3)
        finally:
            wakeups.cancel()
            for task in self.drivers.values():
                task.cancel()
            for task in self.drivers.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.drivers.clear()

    async def _fan_out_changes(self) -> None:
        """Reported state changed: every driver takes a look."""
        while True:
            await self.twin.changed.wait()
            self.twin.changed.clear()
            for event in self._wake.values():
                event.set()
            await asyncio.sleep(0.02)  # coalesce bursts (a thousand devices converging)

    async def _drive(self, rid: uuid.UUID) -> None:
        wake = self._wake[rid]
        try:
            while True:
                try:
                    delay = await self.step(rid)
                except LostOwnership:
                    delay = 0.0
                except TRANSIENT_DB_ERRORS as exc:
                    log.warning("rollout %s: database unavailable (retrying): %s", rid, exc)
                    delay = 1.0
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("rollout %s: step failed; retrying", rid)
                    delay = 2.0
                if delay is None:
                    break
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), min(delay, self.tick))
                wake.clear()
        finally:
            if self.drivers.get(rid) is asyncio.current_task():
                del self.drivers[rid]
                self._wake.pop(rid, None)
                for key in [k for k in self._devices if k[0] == rid]:
                    del self._devices[key]
                for key in [k for k in self._ask_after if k[0] == rid]:
                    del self._ask_after[key]
                self._rewritten = {k for k in self._rewritten if k[0] != rid}

    # --- one step ---------------------------------------------------------------------

    async def step(self, rid: uuid.UUID) -> float | None:
        """Advance the rollout by one transition; the seconds until the next look, or
        None once it is finished."""
        async with self.pool.acquire() as conn:
            r = await self.store.rollout(conn, rid)
        if r.state in TERMINAL:
            return None
        if r.state in ("paused", "awaiting_approval"):
            return self.tick * 4
        if r.state == "waiting_for_window":
            return await self._await_window(r)
        if r.state == "rolling_back":
            await self._roll_back(r)
            return 0.0
        if r.state == "pending":
            first = "shadowing" if r.shadow is not None else "running"
            await self._transition(r, expect=("pending",), rollout={"state": first})
            return 0.0
        if r.state == "running" and r.shadow is not None and r.shadow_state != "passed":
            # resumed after a pause before its shadow phase: no wave before a passing one
            await self._transition(r, rollout={"state": "shadowing"})
            return 0.0
        if r.state == "shadowing":
            async with self.pool.acquire() as conn:
                targets = sorted(await self.store.undrawn(conn, rid, 0))
            return await self.shadow.step(r, targets)
        async with self.pool.acquire() as conn:
            wave = await self.store.wave(conn, rid, r.current_wave)
        handler = {
            "pending": self._start_wave,
            "writing": self._write_wave,
            "converging": self._converging,
            "baking": self._baking,
        }.get(wave.state)
        if handler is None:  # a finished wave under a running rollout: repair the pointer
            log.error("rollout %s: wave %d is %s while running", rid, wave.wave, wave.state)
            return self.tick
        return await handler(r, wave)

    async def _devices_of(self, r: Rollout, wave: int) -> list[str]:
        """The devices ``wave`` drew (the ones it judges)."""
        return (await self._wave_devices(r, wave))[0]

    async def _wave_devices(self, r: Rollout, wave: int) -> tuple[list[str], list[str]]:
        """The devices ``wave`` drew, and its stragglers (read once its draw is stored)."""
        key = (r.rollout_id, wave)
        if key not in self._devices:
            async with self.pool.acquire() as conn:
                self._devices[key] = await self.store.wave_devices(conn, r.rollout_id, wave)
        return self._devices[key]

    async def _start_wave(self, r: Rollout, wave: Wave) -> float:
        if r.approval_wave == wave.wave and r.approved_by is None:
            return await self._hold_for_approval(r, wave)
        if (closed := await self._outside_window(r)) is not None:
            return closed
        waves = await self._wave_list(r)
        last = wave.wave == len(waves) - 1
        key = (r.rollout_id, wave.wave)
        if time.monotonic() < self._ask_after.get(key, 0.0):
            return self.tick
        self._ask_after[key] = time.monotonic() + ASK_EVERY
        async with self.pool.acquire() as conn:
            undrawn = await self.store.undrawn(conn, r.rollout_id, wave.wave)
        try:
            presence = await self.devices.presence(r.selector, undrawn)
        except httpx.HTTPError as exc:  # the gateway's fault, not the wave's: ask again
            log.warning(
                "rollout %s: cannot ask the gateway which devices are online for wave %d "
                "(retrying): %s",
                r.rollout_id,
                wave.wave,
                exc,
            )
            return 2.0
        now = _now()
        absent = {
            d: a
            for d in sorted(undrawn)
            if (a := absence(presence.get(d), now, self.max_silence)) is not None
        }
        drawn = [w.size if w.members is None else w.members for w in waves]
        target = wave_target([w.size for w in waves], drawn, wave.wave)
        draw = draw_wave(undrawn, target, last=last, ready=lambda d: d not in absent)
        taken = set(draw.members) | set(draw.stragglers)
        deferred = [d for d, planned in undrawn.items() if planned == wave.wave and d not in taken]
        why = {d: (a.text, a.since) for d, a in absent.items()}
        if not draw.members:
            # Nobody to draw. A gateway that restarted shows its devices offline until they
            # reconnect (seconds): wait a little, asking again, before concluding.
            since = wave.phase_since
            if since is None or (now - since).total_seconds() < self.offline_grace:
                return await self._await_devices(r, wave, absent)
            if wave.wave == 0:
                # no device to run the canary on: a budget that can never be met
                reason = no_canary(absent, "devices")
                return await self._fail(
                    r, wave, [], {}, [], reason, devices=[], draw=(draw, [], why)
                )
            if not last:
                return await self._skip(r, wave, deferred, why)
        self._devices.pop((r.rollout_id, wave.wave), None)
        previous = await self.twin.get_desired([*draw.members, *draw.stragglers])
        await self._transition(
            r,
            wave=(
                wave,
                {
                    "state": "writing",
                    "started_at": _now(),
                    "phase_since": _now(),
                    "reason": None,
                    "members": len(draw.members),
                    "deferred": len(deferred) + len(draw.stragglers),
                },
            ),
            draw=(draw, deferred, why),
            previous=previous,
            events=[
                RolloutWaveStarted(
                    rollout_id=r.rollout_id,
                    model=r.model,
                    version=r.version,
                    wave=wave.wave,
                    devices=draw.members,
                    stragglers=draw.stragglers,
                )
            ],
        )
        log.info(
            "rollout %s: wave %d started (%d devices%s)",
            r.rollout_id,
            wave.wave,
            len(draw.members),
            f"; {len(deferred)} offline or unhealthy left for the next wave" if deferred else "",
        )
        if draw.stragglers:
            log.info(
                "rollout %s: %d stragglers given the release without being waited for: %s",
                r.rollout_id,
                len(draw.stragglers),
                ", ".join(draw.stragglers[:NAMED]),
            )
        return 0.0

    async def _await_devices(self, r: Rollout, wave: Wave, absent: dict[str, Absence]) -> float:
        """No device left is online and healthy: the wave waits ``offline_grace`` for one,
        with the reason shown, from the first time it found none (stored, so a restart
        does not start the wait again)."""
        if wave.phase_since is None:
            reason = (
                f"waits up to {self.offline_grace:g} s for a device to come online: none of "
                f"the {len(absent)} left is online and healthy ({named_absent(absent)})"
            )
            await self._transition(r, wave=(wave, {"phase_since": _now(), "reason": reason}))
            log.warning("rollout %s: wave %d %s", r.rollout_id, wave.wave, reason)
        return ASK_EVERY

    async def _skip(
        self,
        r: Rollout,
        wave: Wave,
        deferred: list[str],
        why: dict[str, tuple[str, datetime | None]],
    ) -> float:
        """A wave after the first with no device online left: nothing to draw, nothing to
        judge; its share goes on to the next wave (the last gives them the release)."""
        reason = (
            f"no device left is online and healthy: {len(deferred)} of its share "
            "left for the next wave (the last wave gives them the release as stragglers)"
        )
        await self._transition(
            r,
            rollout={"current_wave": r.current_wave + 1},
            wave=(
                wave,
                {
                    "state": "skipped",
                    "started_at": _now(),
                    "finished_at": _now(),
                    "members": 0,
                    "deferred": len(deferred),
                    "reason": reason,
                },
            ),
            draw=(Draw([]), deferred, why),
        )
        log.info("rollout %s: wave %d skipped: %s", r.rollout_id, wave.wave, reason)
        return 0.0

    async def _hold_for_approval(self, r: Rollout, wave: Wave) -> float:
        """The model's release policy gates this wave: wait for an approval."""
        await self._transition(
            r,
            rollout={"state": "awaiting_approval"},
            events=[
                RolloutApprovalRequested(
                    rollout_id=r.rollout_id,
                    model=r.model,
                    version=r.version,
                    wave=wave.wave,
                    requested_by=r.requested_by,
                )
            ],
        )
        log.info("rollout %s: wave %d waits for an approval", r.rollout_id, wave.wave)
        return self.tick * 4

    def _doc(self, r: Rollout) -> DesiredModel:
        doc: DesiredModel = r.desired()
        return doc

    async def _write_wave(self, r: Rollout, wave: Wave) -> float:
        members, stragglers = await self._wave_devices(r, wave.wave)
        if disruption_cap(len(members), r.max_unavailable, r.max_unavailable_percent):
            # a disruption budget: the converging step gives them the release a few at a time
            await self._transition(r, wave=(wave, {"state": "converging", "phase_since": _now()}))
            return 0.0
        if (closed := await self._outside_window(r)) is not None:
            return closed
        doc = self._doc(r)
        await self.twin.put_desired(dict.fromkeys([*members, *stragglers], doc))
        await self._transition(
            r,
            wave=(wave, {"state": "converging", "phase_since": _now()}),
            written=[*members, *stragglers],
        )
        return 0.0

    async def _write_within_budget(
        self, r: Rollout, wave: Wave, members: list[str], p: Progress, cap: int
    ) -> tuple[list[str], list[str], float | None]:
        """Give the release to as many more of the wave's devices as the disruption budget
        allows: at most ``cap`` given it and neither running it nor failed (an update lock
        deferring one holds its slot too: it may start at any moment), each for at most
        its convergence timeout (then it counts as failed and frees its slot: a budget
        never wedges a wave). ``p``: the wave's progress the caller judges by.
        Returns the devices not given it yet, those pending within their timeout (the
        wave waits for them), and the seconds until the next look when the rollout now
        waits for its window."""
        key = (r.rollout_id, wave.wave)
        stragglers = (await self._wave_devices(r, wave.wave))[1]
        async with self.pool.acquire() as conn:
            written = await self.store.written(conn, r.rollout_id, wave.wave)
        doc = self._doc(r)
        if key not in self._rewritten and written:
            # marked before written: a restarted engine writes them again (the same documents)
            await self.twin.put_desired(dict.fromkeys(written, doc))
        self._rewritten.add(key)
        now = _now()

        def within(d: str) -> bool:
            return d in written and (now - written[d]).total_seconds() < r.converge_timeout_seconds

        in_flight = [d for d in p.pending if within(d)]
        busy = len(in_flight) + len([d for d in p.deferred if within(d)])
        unwritten = [d for d in members if d not in written]
        batch = unwritten[: max(cap - busy, 0)]
        if len(batch) == len(unwritten):  # the last of them: the stragglers come along
            batch += [d for d in stragglers if d not in written]
        if not batch:
            return unwritten, in_flight, None
        if (closed := await self._outside_window(r)) is not None:
            return unwritten, in_flight, closed
        await self._transition(r, wave=(wave, {"state": "converging"}), written=batch)
        await self.twin.put_desired(dict.fromkeys(batch, doc))
        log.info(
            "rollout %s: wave %d: %d more devices given the release (%d activating, budget %d)",
            r.rollout_id,
            wave.wave,
            len(batch),
            busy + len([d for d in batch if d in members]),
            cap,
        )
        left = [d for d in unwritten if d not in batch]
        return left, in_flight + [d for d in batch if d in members], None

    async def _outside_window(self, r: Rollout) -> float | None:
        """None when the rollout may write desired state now (no window, or one is open);
        otherwise it goes to ``waiting_for_window`` with the next opening, and the
        seconds until the next look."""
        if r.window_spec is None:
            return None
        now = self.clock()
        schedule = parse_window(r.window_spec)
        if schedule.is_open(now):
            return None
        opens = schedule.next_opening(now)
        await self._transition(r, rollout={"state": "waiting_for_window", "window_opens_at": opens})
        log.info(
            "rollout %s: outside its maintenance window (%s); waits until %s",
            r.rollout_id,
            r.window_spec,
            opens.isoformat(),
        )
        return 0.0

    async def _await_window(self, r: Rollout) -> float:
        """``waiting_for_window``: go on once a window is open (by the engine's clock)."""
        now = self.clock()
        schedule = parse_window(r.window_spec) if r.window_spec else None
        if schedule is None or schedule.is_open(now):
            await self._transition(
                r,
                expect=("waiting_for_window",),
                rollout={"state": "running", "window_opens_at": None},
            )
            log.info("rollout %s: its maintenance window is open", r.rollout_id)
            return 0.0
        opens = schedule.next_opening(now)
        if opens != r.window_opens_at:  # the clock moved (a test, a corrected clock)
            await self._transition(
                r, expect=("waiting_for_window",), rollout={"window_opens_at": opens}
            )
        return min(self.tick * 4, (opens - now).total_seconds())

    async def _converging(self, r: Rollout, wave: Wave) -> float:
        devices = await self._devices_of(r, wave.wave)
        assert r.digest is not None
        p = progress(devices, r.digest, self.twin.reported)
        budget = failure_budget(len(devices), r.max_failures, r.max_failures_percent)
        if wave.verdict == "fail":
            return await self._fail(r, wave, p.converged, p.failed, p.pending, _verdict(wave))
        if len(p.failed) > budget:
            reason = (
                f"{len(p.failed)} of {len(devices)} devices failed to activate "
                f"(budget {budget}): {_name(p.failed)}"
            )
            return await self._fail(r, wave, p.converged, p.failed, p.pending, reason)
        elapsed = _elapsed(wave)
        cap = disruption_cap(len(devices), r.max_unavailable, r.max_unavailable_percent)
        if cap is not None:
            # each device is judged from its own write: converge timeout per device
            unwritten, in_flight, closed = await self._write_within_budget(r, wave, devices, p, cap)
            if closed is not None:
                return closed
            if unwritten or in_flight:
                return self.tick
        elif p.pending and elapsed < r.converge_timeout_seconds:
            return min(self.tick, r.converge_timeout_seconds - elapsed)
        if len(p.failed) + len(p.pending) > budget:
            reason = (
                f"{len(p.pending)} of {len(devices)} devices did not converge within "
                f"{r.converge_timeout_seconds:g} s and {len(p.failed)} failed (budget {budget})"
                + (f": {_name(dict.fromkeys(p.pending, 'not converged'))}" if p.pending else "")
            )
            return await self._fail(r, wave, p.converged, p.failed, p.pending, reason)
        await self._transition(
            r,
            wave=(
                wave,
                {
                    "state": "baking",
                    "phase_since": _now(),
                    "converged": len(p.converged),
                    "failed": len(p.failed) + len(p.pending),
                },
            ),
        )
        log.info(
            "rollout %s: wave %d converged (%d/%d) in %.1f s; baking %g s",
            r.rollout_id,
            wave.wave,
            len(p.converged),
            len(devices),
            elapsed,
            r.bake_seconds,
        )
        return 0.0

    async def _baking(self, r: Rollout, wave: Wave) -> float | None:
        devices = await self._devices_of(r, wave.wave)
        assert r.digest is not None
        p = progress(devices, r.digest, self.twin.reported)
        if wave.verdict == "fail":
            return await self._fail(r, wave, p.converged, p.failed, p.pending, _verdict(wave))
        budget = failure_budget(len(devices), r.max_failures, r.max_failures_percent)
        if len(p.failed) > budget:
            reason = (
                f"{len(p.failed)} of {len(devices)} devices failed while baking "
                f"(budget {budget}): {_name(p.failed)}"
            )
            return await self._fail(r, wave, p.converged, p.failed, p.pending, reason)
        elapsed = _elapsed(wave)
        if devices and elapsed < r.bake_seconds:  # a wave of stragglers only has no cohort
            return min(self.tick, r.bake_seconds - elapsed)
        last = r.current_wave + 1 >= len(await self._wave_list(r))
        outcomes = _outcomes(p.converged, p.failed, p.pending)
        outcomes |= {d: ("deferred", why[:500]) for d, why in p.deferred.items()}
        stragglers = (await self._wave_devices(r, wave.wave))[1]
        late = progress(stragglers, r.digest, self.twin.reported)
        outcomes |= dict.fromkeys(late.converged, ("converged", None))
        outcomes |= {d: ("failed", why[:500]) for d, why in late.failed.items()}
        outcomes |= dict.fromkeys(late.pending, ("straggler", None))
        events: list[Event] = [
            RolloutWaveSucceeded(
                rollout_id=r.rollout_id,
                model=r.model,
                version=r.version,
                wave=wave.wave,
                devices=devices,
                converged=len(p.converged),
                failed=len(p.failed) + len(p.pending),
            )
        ]
        if last:
            events.append(
                RolloutCompleted(
                    rollout_id=r.rollout_id,
                    model=r.model,
                    version=r.version,
                    stragglers=[*late.pending, *late.failed, *p.deferred],
                )
            )
        await self._transition(
            r,
            rollout={"state": "completed", "finished_at": _now()}
            if last
            else {"current_wave": r.current_wave + 1},
            wave=(
                wave,
                {
                    "state": "succeeded",
                    "finished_at": _now(),
                    "converged": len(p.converged),
                    "failed": len(p.failed) + len(p.pending),
                },
            ),
            outcomes=outcomes,
            events=events,
        )
        WAVES.labels("succeeded").inc()
        log.info("rollout %s: wave %d succeeded", r.rollout_id, wave.wave)
        if last:
            ROLLOUTS.labels("completed").inc()
            log.info(
                "rollout %s of %s@%s completed%s",
                r.rollout_id,
                r.model,
                r.version,
                f" ({len(late.pending) + len(late.failed)} stragglers not on it yet)"
                if late.pending or late.failed
                else "",
            )
            return None
        return 0.0

    async def _shadow_report(
        self, model: str, version: str, rollout_id: uuid.UUID
    ) -> dict[str, object]:
        if self.monitor is None:
            raise httpx.HTTPError("no monitor API is configured (EDGELOOP_DEPLOYER_MONITOR_API)")
        return await self.monitor.shadow(model, version, rollout_id)

    async def _shadow_commit(
        self,
        r: Rollout,
        values: dict[str, object],
        expect: tuple[str, ...],
        events: Sequence[Event],
    ) -> None:
        await self._transition(r, expect=expect, rollout=values, events=events)
        if values.get("state") in TERMINAL:
            ROLLOUTS.labels(str(values["state"])).inc()

    async def _wave_list(self, r: Rollout) -> list[Wave]:
        async with self.pool.acquire() as conn:
            return await self.store.waves(conn, r.rollout_id)

    async def _fail(
        self,
        r: Rollout,
        wave: Wave,
        converged: list[str],
        failed: dict[str, str],
        pending: list[str],
        reason: str,
        *,
        devices: list[str] | None = None,
        draw: Drawn | None = None,
    ) -> float:
        if devices is None:
            devices = await self._devices_of(r, wave.wave)
        timed_out = wave.state != "converging" or _elapsed(wave) >= r.converge_timeout_seconds
        await self._transition(
            r,
            rollout={"state": "rolling_back", "reason": f"wave {wave.wave}: {reason}"},
            wave=(
                wave,
                {
                    "state": "failed",
                    "finished_at": _now(),
                    "reason": reason,
                    "converged": len(converged),
                    "failed": len(failed) + len(pending),
                },
            ),
            outcomes=_outcomes(converged, failed, pending, timed_out=timed_out),
            draw=draw,
            events=[
                RolloutWaveFailed(
                    rollout_id=r.rollout_id,
                    model=r.model,
                    version=r.version,
                    wave=wave.wave,
                    devices=devices,
                    reason=reason,
                    converged=len(converged),
                    failed=len(failed) + len(pending),
                )
            ],
        )
        WAVES.labels("failed").inc()
        log.warning("rollout %s: wave %d failed: %s; rolling back", r.rollout_id, wave.wave, reason)
        return 0.0

    async def _roll_back(self, r: Rollout) -> None:
        """Give every device the rollout touched its previous desired document back."""
        t0 = time.perf_counter()
        async with self.pool.acquire() as conn:
            captured = await self.store.captured(conn, r.rollout_id)
        docs: dict[str, DesiredModel | None] = {}
        for device, previous in captured.items():
            if previous is None:
                docs[device] = None  # it had none: it runs nothing, as before
                continue
            old = DesiredModel.model_validate_json(previous)
            docs[device] = old.model_copy(
                update={
                    "explicit_rollback": True,
                    "set_at": datetime.now(UTC),
                    "set_by": f"deployer rollback of {r.rollout_id}",
                }
            )
        await self.twin.put_desired(docs)
        await self._transition(
            r,
            expect=("rolling_back",),
            rollout={"state": "rolled_back", "finished_at": _now()},
            events=[
                RolloutRolledBack(
                    rollout_id=r.rollout_id,
                    model=r.model,
                    version=r.version,
                    reason=r.reason or "rolled back",
                    automatic=r.rollback_by is None,
                )
            ],
        )
        ROLLOUTS.labels("rolled_back").inc()
        log.warning(
            "rollout %s: %d devices given their previous desired state back in %.2f s",
            r.rollout_id,
            len(docs),
            time.perf_counter() - t0,
        )

    async def _transition(
        self,
        r: Rollout,
        *,
        expect: tuple[str, ...] = ("running",),
        rollout: dict[str, object] | None = None,
        wave: tuple[Wave, dict[str, object]] | None = None,
        draw: Drawn | None = None,
        previous: dict[str, bytes | None] | None = None,
        outcomes: dict[str, tuple[str, str | None]] | None = None,
        events: Sequence[Event] = (),
        written: list[str] | None = None,
    ) -> None:
        """One transaction: check ownership and state (the rollout's, and the wave's
        still the one ``wave`` was read in), update, queue the events; in a span of the
        rollout's trace (so are the events it queues)."""
        if wave is not None:
            what = f"wave {wave[0].wave} {wave[1].get('state', 'step')}"
        else:
            what = f"rollout {(rollout or {}).get('state', 'step')}"
        with self.tracer.start_as_current_span(
            what,
            context=parent_context(r.trace_parent),
            attributes={"edgeloop.rollout_id": str(r.rollout_id)},
        ):
            async with self.pool.acquire() as conn, conn.transaction():
                if not await self.store.owns(conn, r.rollout_id, self.owner):
                    raise LostOwnership(r.rollout_id)
                if not await self.store.set_rollout(
                    conn, r.rollout_id, expect=expect, **(rollout or {})
                ):
                    raise LostOwnership(r.rollout_id)  # paused, aborted … meanwhile
                if wave is not None and not await self.store.set_wave(
                    conn, r.rollout_id, wave[0].wave, expect=wave[0].state, **wave[1]
                ):
                    raise LostOwnership(r.rollout_id)  # the wave moved on meanwhile
                if draw is not None and wave is not None:
                    chosen, deferred, why = draw
                    await self.store.assign(
                        conn,
                        r.rollout_id,
                        wave[0].wave,
                        members=chosen.members,
                        stragglers=chosen.stragglers,
                        deferred=deferred,
                        absent=why,
                    )
                if previous is not None:
                    await self.store.capture_previous(conn, r.rollout_id, previous)
                if outcomes:
                    await self.store.set_outcomes(conn, r.rollout_id, outcomes)
                if written:
                    await self.store.mark_written(conn, r.rollout_id, written, _now())
                for event in events:
                    await add_event(conn, self.schema, event)


def _now() -> datetime:
    return datetime.now(UTC)


def shifted_clock(path: Path) -> Callable[[], datetime]:
    """The wall clock moved by the seconds written in the file ``path`` (none, or not a
    number: not moved), read at each call: how a test or a demo shows a rollout waiting
    for its maintenance window and starting at its opening without waiting for it."""

    def now() -> datetime:
        try:
            shift = float(path.read_text().strip() or 0)
        except (OSError, ValueError):
            shift = 0.0
        return datetime.now(UTC) + timedelta(seconds=shift)

    return now


def _elapsed(wave: Wave) -> float:
    since = wave.phase_since or wave.started_at or _now()
    return (_now() - since).total_seconds()


def _name(failed: dict[str, str]) -> str:
    items = [f"{d}: {why}" for d, why in list(failed.items())[:NAMED]]
    more = len(failed) - NAMED
    return "; ".join(items) + (f"; and {more} more" if more > 0 else "")


def _verdict(wave: Wave) -> str:
    reasons = "; ".join(wave.verdict_reasons or []) or "no reason given"
    return f"the canary verdict is fail: {reasons}"


def _outcomes(
    converged: list[str], failed: dict[str, str], pending: list[str], *, timed_out: bool = True
) -> dict[str, tuple[str, str | None]]:
    """How each device ended its wave: converged, failed (with why), timeout — or still
    pending when the wave ended before its timeout (another device's failure)."""
    out: dict[str, tuple[str, str | None]] = dict.fromkeys(converged, ("converged", None))
    out.update({d: ("failed", why[:500]) for d, why in failed.items()})
    out.update(dict.fromkeys(pending, ("timeout" if timed_out else "pending", None)))
    return out
