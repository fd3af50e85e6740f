"""The deployer's PostgreSQL store (schema ``deployer``): rollouts, waves, devices."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from edgeloop.contracts.events import RolloutRequested, ShadowSpec, WavePlan
from edgeloop.contracts.twin import DesiredModel
from edgeloop.kit.db import Conn

ACTIVE = (
    "pending",
    "shadowing",
    "running",
    "paused",
    "awaiting_approval",
    "waiting_for_window",
    "rolling_back",
)
TERMINAL = ("completed", "rolled_back", "aborted", "refused", "shadow_passed", "shadow_failed")
#: States of a retirement under way (one per version at a time).
UNDER_WAY = ("replacing", "retiring")
#: A device's row of a rollout's plan, as the API shows it.
_PLAN_COLUMNS = "device_id, wave, outcome, detail, straggler, absent, offline_since, written_at"
#: Retirements with the state and reason of their replacement rollout.
_RETIREMENTS = """SELECT t.*, r.state AS rollout_state, r.reason AS rollout_reason
    FROM retirements t LEFT JOIN rollouts r USING (rollout_id)"""


@dataclass(frozen=True)
class Rollout:
    """One row of ``rollouts``."""

    rollout_id: uuid.UUID
    model: str
    version: str
    image: str | None
    digest: str | None
    model_digest: str | None
    selector: dict[str, str]
    waves: list[WavePlan]
    bake_seconds: float
    converge_timeout_seconds: float
    max_failures: int | None
    max_failures_percent: float | None
    state: str
    current_wave: int
    reason: str | None
    requested_by: str | None
    rollback_by: str | None
    trace_parent: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    approval_wave: int | None = None
    approved_by: str | None = None
    approved_at: datetime | None = None
    approval_reason: str | None = None
    device_deadline_seconds: float = 3600.0
    window_spec: str | None = None
    """Its maintenance windows (``edgeloop.contracts.windows``), or None: any time."""
    window_opens_at: datetime | None = None
    """While ``waiting_for_window``: when its window next opens."""
    max_unavailable: int | None = None
    max_unavailable_percent: float | None = None
    shadow: ShadowSpec | None = None
    """The rollout's shadow phase (None: none)."""
    shadow_state: str | None = None
    shadow_started_at: datetime | None = None
    shadow_devices: list[str] | None = None
    shadow_result: dict[str, Any] | None = None

    def desired(self, kind: type[DesiredModel] = DesiredModel, **extra: Any) -> Any:
        """The rollout's image as a device's desired document (``kind``: or as its
        challenger, ``ShadowModel``, with ``extra``)."""
        return kind(
            model=self.model,
            version=self.version,
            image=self.image,
            manifest_digest=self.digest,
            model_digest=self.model_digest,
            rollout_id=self.rollout_id,
            trace_parent=self.trace_parent,
            **{"set_by": f"deployer rollout {self.rollout_id}", **extra},
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["rollout_id"] = str(self.rollout_id)
        out["waves"] = [w.model_dump(exclude_none=True) for w in self.waves]
        out["window"] = out.pop("window_spec")
        out["shadow"] = self.shadow.model_dump() if self.shadow else None
        for key in (
            "created_at",
            "updated_at",
            "finished_at",
            "approved_at",
            "window_opens_at",
            "shadow_started_at",
        ):
            out[key] = out[key].isoformat() if out[key] else None
        return out


@dataclass(frozen=True)
class Wave:
    """One row of ``waves``."""

    rollout_id: uuid.UUID
    wave: int
    size: int
    state: str
    started_at: datetime | None
    phase_since: datetime | None
    finished_at: datetime | None
    converged: int
    failed: int
    verdict: str | None
    verdict_reasons: list[str] | None
    reason: str | None
    members: int | None = None
    """Devices it drew when it started (``size`` is what the plan gave it)."""
    deferred: int = 0
    """Devices of its share offline or unhealthy at its start (left for a later wave, or
    on the last wave given the release as stragglers)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "rollout_id"}
        for key in ("started_at", "phase_since", "finished_at"):
            out[key] = out[key].isoformat() if out[key] else None
        return out


def _rollout(row: asyncpg.Record) -> Rollout:
    d = dict(row)
    d.pop("owner", None)
    d.pop("lease_until", None)
    d["selector"] = json.loads(d["selector"])
    d["waves"] = [WavePlan.model_validate(w) for w in json.loads(d["waves"])]
    d["shadow"] = ShadowSpec.model_validate_json(d["shadow"]) if d.get("shadow") else None
    for key in ("shadow_devices", "shadow_result"):
        d[key] = json.loads(d[key]) if d.get(key) else None
    return Rollout(**d)


def _wave(row: asyncpg.Record) -> Wave:
    d = dict(row)
    if d["verdict_reasons"] is not None:
        d["verdict_reasons"] = json.loads(d["verdict_reasons"])
    return Wave(**d)


class Store:
    """Queries of the deployer; each takes the connection (and so the transaction) to use."""

    async def rollout(self, conn: Conn, rollout_id: uuid.UUID, *, lock: bool = False) -> Rollout:
        """The rollout (``KeyError`` when unknown); ``lock`` holds its row for the transaction."""
        row = await conn.fetchrow(
            "SELECT * FROM rollouts WHERE rollout_id = $1" + (" FOR UPDATE" if lock else ""),
            rollout_id,
        )
        if row is None:
            raise KeyError(rollout_id)
        return _rollout(row)

    async def find(self, conn: Conn, rollout_id: uuid.UUID) -> Rollout | None:
        """The rollout, or None."""
        row = await conn.fetchrow("SELECT * FROM rollouts WHERE rollout_id = $1", rollout_id)
        return _rollout(row) if row else None

    async def recent(
        self, conn: Conn, *, states: list[str] | None = None, model: str | None = None, limit: int
    ) -> list[Rollout]:
        """Newest first."""
        rows = await conn.fetch(
            """SELECT * FROM rollouts
               WHERE ($1::text[] IS NULL OR state = ANY($1)) AND ($2::text IS NULL OR model = $2)
               ORDER BY created_at DESC LIMIT $3""",
            states,
            model,
            limit,
        )
        return [_rollout(r) for r in rows]

    async def waves(self, conn: Conn, rollout_id: uuid.UUID) -> list[Wave]:
        """The rollout's waves in order."""
        rows = await conn.fetch(
            "SELECT * FROM waves WHERE rollout_id = $1 ORDER BY wave", rollout_id
        )
        return [_wave(r) for r in rows]

    async def wave(self, conn: Conn, rollout_id: uuid.UUID, wave: int) -> Wave:
        """One wave."""
        row = await conn.fetchrow(
            "SELECT * FROM waves WHERE rollout_id = $1 AND wave = $2", rollout_id, wave
        )
        if row is None:
            raise KeyError((rollout_id, wave))
        return _wave(row)

    async def wave_devices(
        self, conn: Conn, rollout_id: uuid.UUID, wave: int
    ) -> tuple[list[str], list[str]]:
        """The devices of one wave in plan order: those it drew, and its stragglers."""
        rows = await conn.fetch(
            "SELECT device_id, straggler FROM rollout_devices WHERE rollout_id = $1 AND wave = $2 "
            "ORDER BY position",
            rollout_id,
            wave,
        )
        return (
            [r["device_id"] for r in rows if not r["straggler"]],
            [r["device_id"] for r in rows if r["straggler"]],
        )

    async def written(self, conn: Conn, rollout_id: uuid.UUID, wave: int) -> dict[str, datetime]:
        """Device → when the engine gave it the release, of one wave's devices given it."""
        rows = await conn.fetch(
            "SELECT device_id, written_at FROM rollout_devices "
            "WHERE rollout_id = $1 AND wave = $2 AND written_at IS NOT NULL",
            rollout_id,
            wave,
        )
        return {r["device_id"]: r["written_at"] for r in rows}

    async def mark_written(
        self, conn: Conn, rollout_id: uuid.UUID, devices: list[str], at: datetime
    ) -> None:
        """Record that ``devices`` are given the release (before it is written, so a
        restarted engine writes them again rather than more than its budget)."""
        await conn.execute(
            "UPDATE rollout_devices SET written_at = $3 "
            "WHERE rollout_id = $1 AND device_id = ANY($2) AND written_at IS NULL",
            rollout_id,
            devices,
            at,
        )

    async def undrawn(self, conn: Conn, rollout_id: uuid.UUID, wave: int) -> dict[str, int]:
        """Device → planned wave, of the devices no wave before ``wave`` drew."""
        rows = await conn.fetch(
            "SELECT device_id, wave FROM rollout_devices WHERE rollout_id = $1 AND wave >= $2",
            rollout_id,
            wave,
        )
        return {r["device_id"]: r["wave"] for r in rows}

    async def assign(
        self,
        conn: Conn,
        rollout_id: uuid.UUID,
        wave: int,
        *,
        members: list[str],
        stragglers: list[str],
        deferred: list[str],
        absent: dict[str, tuple[str, datetime | None]],
    ) -> None:
        """Record a wave's draw: its members and stragglers are in ``wave``, the devices
        of its share it ``deferred`` move to the next wave; ``absent`` says why each
        device passed over was (offline since, unhealthy)."""
        moves = [(d, wave, False) for d in members] + [(d, wave, True) for d in stragglers]
        moves += [(d, wave + 1, False) for d in deferred]
        await conn.execute(
            """UPDATE rollout_devices d SET wave = m.wave, straggler = m.straggler
               FROM unnest($2::text[], $3::int[], $4::boolean[]) AS m(device_id, wave, straggler)
               WHERE d.rollout_id = $1 AND d.device_id = m.device_id""",
            rollout_id,
            [m[0] for m in moves],
            [m[1] for m in moves],
            [m[2] for m in moves],
        )
        await conn.execute(
            """UPDATE rollout_devices d SET absent = a.absent, offline_since = a.since
               FROM unnest($2::text[], $3::text[], $4::timestamptz[]) AS a(device_id, absent, since)
               WHERE d.rollout_id = $1 AND d.device_id = a.device_id""",
            rollout_id,
            [*absent, *members],
            [a for a, _ in absent.values()] + [None] * len(members),
            [t for _, t in absent.values()] + [None] * len(members),
        )

    async def conflicting(self, conn: Conn, devices: list[str]) -> tuple[uuid.UUID, int] | None:
        """An active rollout holding any of ``devices``, and how many it holds."""
        row = await conn.fetchrow(
            """SELECT d.rollout_id, count(*) AS n FROM rollout_devices d
               JOIN rollouts r USING (rollout_id)
               WHERE r.state = ANY($1) AND d.device_id = ANY($2)
               GROUP BY d.rollout_id ORDER BY n DESC LIMIT 1""",
            list(ACTIVE),
            devices,
        )
        return (row["rollout_id"], row["n"]) if row else None

    async def insert(
        self,
        conn: Conn,
        req: RolloutRequested,
        *,
        image: str | None,
        digest: str | None,
        model_digest: str | None,
        plan: list[list[str]],
        state: str,
        reason: str | None = None,
        trace_parent: str | None = None,
        approval_wave: int | None = None,
        shadow: ShadowSpec | None = None,
    ) -> None:
        """A new rollout with its plan (``state`` pending, or refused with ``reason``);
        ``shadow``: its shadow phase (the request's, or its model's policy's)."""
        await conn.execute(
            """INSERT INTO rollouts (rollout_id, model, version, image, digest, model_digest,
                   selector, waves, bake_seconds, converge_timeout_seconds, max_failures,
                   max_failures_percent, state, reason, requested_by, trace_parent, finished_at,
                   approval_wave, device_deadline_seconds, window_spec, max_unavailable,
                   max_unavailable_percent, shadow)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9, $10, $11, $12, $13,
                       $14, $15, $16, CASE WHEN $13 = 'refused' THEN now() END, $17, $18,
                       $19, $20, $21, $22::jsonb)""",
            req.rollout_id,
            req.model,
            req.version,
            image,
            digest,
            model_digest,
            json.dumps(req.selector),
            json.dumps([w.model_dump(exclude_none=True) for w in req.waves]),
            req.bake_seconds,
            req.converge_timeout_seconds,
            req.max_failures,
            req.max_failures_percent,
            state,
            reason,
            req.requested_by,
            trace_parent,
            approval_wave,
            req.device_deadline_seconds,
            req.window,
            req.max_unavailable,
            req.max_unavailable_percent,
            shadow.model_dump_json() if shadow else None,
        )
        await conn.executemany(
            "INSERT INTO waves (rollout_id, wave, size) VALUES ($1, $2, $3)",
            [(req.rollout_id, i, len(devices)) for i, devices in enumerate(plan)],
        )
        ranked = enumerate((i, device) for i, devices in enumerate(plan) for device in devices)
        await conn.copy_records_to_table(
            "rollout_devices",
            columns=["rollout_id", "device_id", "wave", "position"],
            records=[(req.rollout_id, device, i, pos) for pos, (i, device) in ranked],
        )

    async def set_rollout(
        self, conn: Conn, rollout_id: uuid.UUID, *, expect: tuple[str, ...], **values: Any
    ) -> bool:
        """Update the rollout if its state is one of ``expect``; whether it was."""
        cols = list(values)
        sets = "".join(f"{c} = ${i + 3}, " for i, c in enumerate(cols))
        status = await conn.execute(
            f"UPDATE rollouts SET {sets}updated_at = now() "
            "WHERE rollout_id = $1 AND state = ANY($2)",
            rollout_id,
            list(expect),
            *[values[c] for c in cols],
        )
        return status != "UPDATE 0"

    async def set_wave(
        self, conn: Conn, rollout_id: uuid.UUID, wave: int, *, expect: str, **values: Any
    ) -> bool:
        """Update one wave if its state is still ``expect``; whether it was."""
        cols = list(values)
        sets = ", ".join(
            f"{c} = ${i + 4}" + ("::jsonb" if c == "verdict_reasons" else "")
            for i, c in enumerate(cols)
        )
        status = await conn.execute(
            f"UPDATE waves SET {sets} WHERE rollout_id = $1 AND wave = $2 AND state = $3",
            rollout_id,
            wave,
            expect,
            *[json.dumps(values[c]) if c == "verdict_reasons" else values[c] for c in cols],
        )
        return status != "UPDATE 0"

    async def capture_previous(
        self, conn: Conn, rollout_id: uuid.UUID, previous: dict[str, bytes | None]
    ) -> None:
        """Keep each device's desired document from before the rollout (first time only)."""
        devices = list(previous)
        await conn.execute(
            """UPDATE rollout_devices d SET previous = p.doc::jsonb, captured = true
               FROM unnest($2::text[], $3::text[]) AS p(device_id, doc)
               WHERE d.rollout_id = $1 AND d.device_id = p.device_id AND NOT d.captured""",
            rollout_id,
            devices,
            [(previous[d] or b"").decode() or None for d in devices],
        )

    async def set_outcomes(
        self, conn: Conn, rollout_id: uuid.UUID, outcomes: dict[str, tuple[str, str | None]]
    ) -> None:
        """Record how each device ended its wave (converged, failed, timeout)."""
        devices = list(outcomes)
        await conn.execute(
            """UPDATE rollout_devices d SET outcome = o.outcome, detail = o.detail
               FROM unnest($2::text[], $3::text[], $4::text[]) AS o(device_id, outcome, detail)
               WHERE d.rollout_id = $1 AND d.device_id = o.device_id""",
            rollout_id,
            devices,
            [outcomes[d][0] for d in devices],
            [outcomes[d][1] for d in devices],
        )

    async def captured(self, conn: Conn, rollout_id: uuid.UUID) -> dict[str, str | None]:
        """Device → desired document before the rollout, for devices the rollout touched."""
        rows = await conn.fetch(
            "SELECT device_id, previous FROM rollout_devices WHERE rollout_id = $1 AND captured",
            rollout_id,
        )
        return {r["device_id"]: r["previous"] for r in rows}

    async def devices(self, conn: Conn, rollout_id: uuid.UUID) -> list[dict[str, Any]]:
        """Every device of the plan with its wave, outcome, whether it is a straggler and
        why it was passed over (``absent``, ``offline_since``)."""
        rows = await conn.fetch(
            f"SELECT {_PLAN_COLUMNS} FROM rollout_devices WHERE rollout_id = $1 "
            "ORDER BY wave, position",
            rollout_id,
        )
        return [dict(r) for r in rows]

    async def device_rollouts(
        self, conn: Conn, device_id: str, limit: int
    ) -> list[tuple[Rollout, dict[str, Any]]]:
        """The rollouts whose plan has ``device_id``, newest first, each with the device's
        row of its plan (as :meth:`devices` gives it)."""
        rows = await conn.fetch(
            """SELECT r.* FROM rollouts r JOIN rollout_devices d USING (rollout_id)
               WHERE d.device_id = $1 ORDER BY r.created_at DESC LIMIT $2""",
            device_id,
            limit,
        )
        out = []
        for row in rows:
            mine = await conn.fetchrow(
                f"SELECT {_PLAN_COLUMNS} FROM rollout_devices "
                "WHERE rollout_id = $1 AND device_id = $2",
                row["rollout_id"],
                device_id,
            )
            assert mine is not None  # the join found it
            out.append((_rollout(row), dict(mine)))
        return out

    async def later_rollout(self, conn: Conn, rollout: Rollout) -> uuid.UUID | None:
        """A rollout admitted after ``rollout`` that touches one of its devices."""
        return await conn.fetchval(  # type: ignore[no-any-return]
            """SELECT r.rollout_id FROM rollouts r
               JOIN rollout_devices d ON d.rollout_id = r.rollout_id
               WHERE r.created_at > $2 AND r.state <> 'refused' AND d.device_id IN
                   (SELECT device_id FROM rollout_devices WHERE rollout_id = $1 AND captured)
               LIMIT 1""",
            rollout.rollout_id,
            rollout.created_at,
        )

    async def claim(self, conn: Conn, owner: str, lease_seconds: float) -> list[uuid.UUID]:
        """Claim (or renew) the active rollouts no other live replica holds."""
        rows = await conn.fetch(
            """UPDATE rollouts SET owner = $1,
                   lease_until = now() + make_interval(secs => $2)
               WHERE state = ANY($3)
                 AND (owner IS NULL OR owner = $1 OR lease_until < now())
               RETURNING rollout_id""",
            owner,
            lease_seconds,
            list(ACTIVE),
        )
        return [r["rollout_id"] for r in rows]

    async def owns(self, conn: Conn, rollout_id: uuid.UUID, owner: str) -> bool:
        """Whether ``owner`` still holds the rollout (checked in each transition)."""
        return bool(
            await conn.fetchval(
                "SELECT owner = $2 FROM rollouts WHERE rollout_id = $1 FOR UPDATE",
                rollout_id,
                owner,
            )
        )

    # --- retirements -------------------------------------------------------------------

    async def active_rollout_of(self, conn: Conn, model: str, version: str) -> uuid.UUID | None:
        """An active rollout of ``model@version``, if any."""
        return await self._of_version(conn, "rollout", model, version, ACTIVE)

    async def _of_version(
        self, conn: Conn, table: str, model: str, version: str, states: tuple[str, ...]
    ) -> uuid.UUID | None:
        return await conn.fetchval(  # type: ignore[no-any-return]
            f"SELECT {table}_id FROM {table}s WHERE model = $1 AND version = $2 "
            "AND state = ANY($3) LIMIT 1",
            model,
            version,
            list(states),
        )

    async def retirement(
        self, conn: Conn, retirement_id: uuid.UUID, *, lock: bool = False
    ) -> dict[str, Any] | None:
        """One retirement with its rollout's state and reason; ``lock`` holds the row
        (``SKIP LOCKED``: None when another replica drives it)."""
        row = await conn.fetchrow(
            f"{_RETIREMENTS} WHERE t.retirement_id = $1"
            + (" FOR UPDATE OF t SKIP LOCKED" if lock else ""),
            retirement_id,
        )
        return _retirement(row) if row else None

    async def open_retirement(self, conn: Conn, model: str, version: str) -> uuid.UUID | None:
        """The retirement of ``model@version`` under way, if any."""
        return await self._of_version(conn, "retirement", model, version, UNDER_WAY)

    async def insert_retirement(self, conn: Conn, **values: Any) -> None:
        """A new retirement row (``devices`` a list)."""
        values["devices"] = json.dumps(values.get("devices") or [])
        cols = list(values)
        params = ", ".join(
            f"${i + 1}" + ("::jsonb" if c == "devices" else "") for i, c in enumerate(cols)
        )
        await conn.execute(
            f"INSERT INTO retirements ({', '.join(cols)}) VALUES ({params})", *values.values()
        )

    async def set_retirement(self, conn: Conn, retirement_id: uuid.UUID, **values: Any) -> None:
        """Update a retirement."""
        cols = list(values)
        sets = "".join(f"{c} = ${i + 2}, " for i, c in enumerate(cols))
        await conn.execute(
            f"UPDATE retirements SET {sets}updated_at = now() WHERE retirement_id = $1",
            retirement_id,
            *values.values(),
        )

    async def pending_retirements(self, conn: Conn) -> list[uuid.UUID]:
        """Retirements with something left to do (a rollout to follow, a registry call)."""
        rows = await conn.fetch(
            "SELECT retirement_id FROM retirements "
            "WHERE NOT synced OR state = ANY($1) ORDER BY created_at",
            list(UNDER_WAY),
        )
        return [r["retirement_id"] for r in rows]

    async def retirements(self, conn: Conn, model: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first."""
        rows = await conn.fetch(
            f"""{_RETIREMENTS}
               WHERE $1::text IS NULL OR t.model = $1 ORDER BY t.created_at DESC LIMIT $2""",
            model,
            limit,
        )
        return [_retirement(r) for r in rows]


def _retirement(row: asyncpg.Record) -> dict[str, Any]:
    out = dict(row)
    out["devices"] = json.loads(out["devices"])
    return out
