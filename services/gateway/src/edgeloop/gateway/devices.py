"""The device registry (PostgreSQL, schema ``gateway``): who is enrolled with which
certificate, labels, sessions, and what each device last reported.

Only enrolment labels count (selectors, rollout targeting, monitor groups): what a device
says about itself in Hello is kept apart as ``reported_labels``. Enrolment and revocation
are audited in the transaction of the change."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import asyncpg

from edgeloop.gateway.pki import IssuedCert
from edgeloop.kit import audit


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the registry knows it."""

    device_id: str
    labels: dict[str, str]
    """Enrolment labels: the only ones selectors and groups use."""
    reported_labels: dict[str, str]
    """What the device said about itself in its last Hello (an attribute, nothing more)."""
    enrolled_at: datetime
    first_seen: datetime | None
    last_seen: datetime | None
    online: bool
    session_id: str | None
    gateway_id: str | None
    model: str | None
    version: str | None
    digest: str | None
    state: str | None
    error: str | None
    fingerprint: str
    revoked: bool
    revoked_at: datetime | None
    cert_not_after: datetime
    refusals: dict[str, int]
    """Telemetry batches the gateway refused or held back, per kind of fault."""
    last_refusal: str | None
    last_refusal_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
        return out


_COLUMNS = (
    "device_id, labels, hello_labels, enrolled_at, first_seen, last_seen, online, session_id,"
    " gateway_id, model, version, digest, state, error, fingerprint, revoked, revoked_at,"
    " cert_not_after, refusals, last_refusal, last_refusal_at"
)


def _record(row: asyncpg.Record) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"],
        labels=json.loads(row["labels"]),
        reported_labels=json.loads(row["hello_labels"]),
        enrolled_at=row["enrolled_at"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        online=row["online"],
        session_id=row["session_id"],
        gateway_id=row["gateway_id"],
        model=row["model"],
        version=row["version"],
        digest=row["digest"],
        state=row["state"],
        error=row["error"],
        fingerprint=row["fingerprint"],
        revoked=row["revoked"],
        revoked_at=row["revoked_at"],
        cert_not_after=row["cert_not_after"],
        refusals=json.loads(row["refusals"]),
        last_refusal=row["last_refusal"],
        last_refusal_at=row["last_refusal_at"],
    )


class DeviceStore:
    """Queries of the device registry."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "gateway") -> None:
        self.pool = pool
        self.t = f"{schema}.devices"

    async def enroll(
        self, device_id: str, labels: Mapping[str, str], cert: IssuedCert, *, actor: str
    ) -> DeviceRecord:
        """Enrol, or re-enrol (the new certificate replaces the old one, labels too);
        audited."""
        async with self.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(
                f"SELECT labels::text, fingerprint, revoked FROM {self.t} WHERE device_id = $1",
                device_id,
            )
            row = await conn.fetchrow(
                f"""INSERT INTO {self.t} AS d
                        (device_id, labels, fingerprint, cert_serial, cert_not_after)
                    VALUES ($1, $2::jsonb, $3, $4, $5)
                    ON CONFLICT (device_id) DO UPDATE SET
                        labels = EXCLUDED.labels, fingerprint = EXCLUDED.fingerprint,
                        cert_serial = EXCLUDED.cert_serial,
                        cert_not_after = EXCLUDED.cert_not_after, revoked = false,
                        revoked_at = NULL, enrolled_at = now()
                    RETURNING {_COLUMNS}""",
                device_id,
                json.dumps(dict(labels)),
                cert.fingerprint,
                cert.serial,
                cert.not_after,
            )
            assert row is not None  # an upsert returns its row
            await audit.record(
                conn,
                service="gateway",
                actor=actor,
                action="device.enroll",
                subject=f"device {device_id}",
                before=None
                if before is None
                else {
                    "labels": json.loads(before["labels"]),
                    "fingerprint": before["fingerprint"],
                    "revoked": before["revoked"],
                },
                after={
                    "labels": dict(labels),
                    "fingerprint": cert.fingerprint,
                    "expires_at": cert.not_after,
                },
            )
        return _record(row)

    async def revoke(self, device_id: str, *, actor: str) -> bool:
        """Refuse the device's certificate from now on (its live sessions end within a
        second, its artifact fetches at once); audited. False if unknown."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT fingerprint, revoked FROM {self.t} WHERE device_id = $1 FOR UPDATE",
                device_id,
            )
            await conn.execute(
                f"""UPDATE {self.t} SET revoked = true, revoked_at = coalesce(revoked_at, now())
                    WHERE device_id = $1""",
                device_id,
            )
            if row is None:
                return False
            await audit.record(
                conn,
                service="gateway",
                actor=actor,
                action="device.revoke",
                subject=f"device {device_id}",
                before={"revoked": row["revoked"]},
                after={"revoked": True, "fingerprint": row["fingerprint"]},
            )
        return True

    async def identity_changes(
        self, since: datetime | None
    ) -> tuple[datetime, list[tuple[str, str, bool]]]:
        """The database's clock, and (device, current fingerprint, revoked) of devices
        revoked or re-enrolled since ``since``: sessions on a revoked or replaced
        certificate must end."""
        async with self.pool.acquire() as conn:
            now = await conn.fetchval("SELECT now()")
            if since is None:
                return now, []
            rows = await conn.fetch(
                f"""SELECT device_id, fingerprint, revoked FROM {self.t}
                    WHERE revoked_at >= $1 OR enrolled_at >= $1""",
                since,
            )
        return now, [(r["device_id"], r["fingerprint"], r["revoked"]) for r in rows]

    async def refused(self, refusals: Mapping[str, tuple[dict[str, int], str, datetime]]) -> None:
        """Add telemetry refusals per device and kind (device → (counts, last reason,
        when)), in one statement."""
        if not refusals:
            return
        await self.pool.execute(
            f"""UPDATE {self.t} AS d SET
                    refusals = (SELECT coalesce(jsonb_object_agg(k,
                                    coalesce((d.refusals->>k)::bigint, 0)
                                    + coalesce((s.add->>k)::bigint, 0)), '{{}}'::jsonb)
                                FROM jsonb_object_keys(d.refusals || s.add) AS k),
                    last_refusal = s.reason, last_refusal_at = s.at
                FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::timestamptz[])
                    AS s(id, add, reason, at)
                WHERE d.device_id = s.id""",
            list(refusals),
            [json.dumps(v[0]) for v in refusals.values()],
            [v[1][:1000] for v in refusals.values()],
            [v[2] for v in refusals.values()],
        )

    async def check_certificate(self, device_id: str, fingerprint: str) -> str | None:
        """None when ``fingerprint`` is the device's current certificate, else why not."""
        row = await self.pool.fetchrow(
            f"SELECT fingerprint, revoked FROM {self.t} WHERE device_id = $1", device_id
        )
        if row is None:
            return f"device {device_id} is not enrolled"
        if row["revoked"]:
            return f"device {device_id} is revoked"
        if row["fingerprint"] != fingerprint:
            return f"the certificate of device {device_id} was replaced by a newer enrolment"
        return None

    async def connected(
        self,
        device_id: str,
        *,
        session_id: str,
        gateway_id: str,
        labels: Mapping[str, str],
        model: str | None,
        version: str | None,
        digest: str | None,
        at: datetime,
    ) -> dict[str, str]:
        """A session opened; the device's enrolment labels (``labels``, what Hello said,
        is stored apart as reported attributes)."""
        enrolled = await self.pool.fetchval(
            f"""UPDATE {self.t} SET online = true, session_id = $2, gateway_id = $3,
                    hello_labels = $4::jsonb, model = $5, version = $6, digest = $7,
                    first_seen = coalesce(first_seen, $8), last_seen = $8
                WHERE device_id = $1
                RETURNING labels::text""",
            device_id,
            session_id,
            gateway_id,
            json.dumps(dict(labels)),
            model,
            version,
            digest,
            at,
        )
        return dict(json.loads(enrolled)) if enrolled else {}

    async def disconnected(self, device_id: str, session_id: str, at: datetime) -> None:
        """A session ended (ignored if a newer session took over)."""
        await self.pool.execute(
            f"""UPDATE {self.t} SET online = false, last_seen = $3
                WHERE device_id = $1 AND session_id = $2""",
            device_id,
            session_id,
            at,
        )

    async def touch(self, seen: Mapping[str, datetime]) -> None:
        """Last-seen times of many devices, in one statement."""
        if not seen:
            return
        await self.pool.execute(
            f"""UPDATE {self.t} AS d SET last_seen = s.at
                FROM unnest($1::text[], $2::timestamptz[]) AS s(id, at)
                WHERE d.device_id = s.id AND (d.last_seen IS NULL OR d.last_seen < s.at)""",
            list(seen.keys()),
            list(seen.values()),
        )

    async def reported(
        self,
        device_id: str,
        *,
        state: str,
        model: str | None,
        version: str | None,
        digest: str | None,
        error: str | None,
        at: datetime,
    ) -> None:
        """The device's latest report."""
        await self.pool.execute(
            f"""UPDATE {self.t} SET state = $2, model = $3, version = $4, digest = $5,
                    error = $6, reported_at = $7
                WHERE device_id = $1""",
            device_id,
            state,
            model,
            version,
            digest,
            error,
            at,
        )

    async def mark_gateway_offline(self, gateway_id: str) -> int:
        """Sessions of ``gateway_id`` that never closed (it stopped): offline now."""
        status = await self.pool.execute(
            f"UPDATE {self.t} SET online = false WHERE gateway_id = $1 AND online", gateway_id
        )
        return int(status.split()[-1])

    async def list(
        self,
        selector: Mapping[str, str] | None = None,
        *,
        online: bool | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[DeviceRecord]:
        """Devices whose enrolment labels include ``selector``, by id."""
        rows = await self.pool.fetch(
            f"""SELECT {_COLUMNS} FROM {self.t}
                WHERE labels @> $1::jsonb
                  AND ($2::boolean IS NULL OR online = $2)
                ORDER BY device_id LIMIT $3 OFFSET $4""",
            json.dumps(dict(selector or {})),
            online,
            limit,
            offset,
        )
        return [_record(r) for r in rows]

    async def counts(self, selector: Mapping[str, str] | None = None) -> dict[str, int]:
        """How many devices whose enrolment labels include ``selector`` are online and
        offline (without reading them)."""
        row = await self.pool.fetchrow(
            f"""SELECT count(*) FILTER (WHERE online) AS online,
                       count(*) FILTER (WHERE NOT online) AS offline
                FROM {self.t} WHERE labels @> $1::jsonb""",
            json.dumps(dict(selector or {})),
        )
        assert row is not None  # an aggregate always has its row
        return {"online": int(row["online"]), "offline": int(row["offline"])}

    async def get(self, device_id: str) -> DeviceRecord | None:
        """One device, or None."""
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM {self.t} WHERE device_id = $1", device_id
        )
        return _record(row) if row else None
