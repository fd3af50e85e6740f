"""The audit trail: who changed what, when and why — append-only and hash-chained.

Every state-changing action (a version registered, an alias moved, a build, a
validation verdict, a rollout started, paused, approved, rolled back, an alarm
acknowledged, a sample labelled …) calls :func:`record` in the transaction of the change,
so the record exists exactly when the change does. Records form one chain for the whole
platform (table ``audit.records``): each carries the hash of the one before, and its own
hash covers every field, so changing, inserting or deleting a record breaks the chain at
that point (:func:`verify` finds the first broken link). Appending takes a transaction
lock on the chain's head: audited actions of the whole platform serialise at their
commit, which control-plane actions (not telemetry) afford.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edgeloop.kit.db import Conn
from edgeloop.kit.tracing import current_trace_id

GENESIS = "0" * 64
"""The ``prev_hash`` of the first record."""

_FIELDS = (
    "seq",
    "at",
    "service",
    "actor",
    "action",
    "subject",
    "model",
    "version",
    "before",
    "after",
    "reason",
    "trace_id",
    "prev_hash",
)


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value


def _json(value: Any) -> Any:
    """``value`` as it reads back from jsonb (datetimes, UUIDs … as strings)."""
    return None if value is None else json.loads(json.dumps(value, default=str))


def record_hash(fields: dict[str, Any]) -> str:
    """The SHA-256 of a record's fields (canonical JSON, sorted keys)."""
    payload = {k: _canonical(fields.get(k)) for k in _FIELDS}
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()


async def record(
    conn: Conn,
    *,
    service: str,
    actor: str,
    action: str,
    subject: str,
    model: str | None = None,
    version: str | None = None,
    before: Any = None,
    after: Any = None,
    reason: str | None = None,
) -> int:
    """Append a record in the caller's transaction; its sequence number."""
    if not conn.is_in_transaction():
        raise RuntimeError("an audit record must be written in the transaction of its change")
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('edgeloop:audit-chain'))")
    head = await conn.fetchrow("SELECT seq, hash FROM audit.records ORDER BY seq DESC LIMIT 1")
    fields: dict[str, Any] = {
        "seq": (head["seq"] + 1) if head else 1,
        "at": datetime.now(UTC),
        "service": service,
        "actor": actor,
        "action": action,
        "subject": subject,
        "model": model,
        "version": version,
        "before": _json(before),
        "after": _json(after),
        "reason": reason,
        "trace_id": current_trace_id(),
        "prev_hash": head["hash"] if head else GENESIS,
    }
    digest = record_hash(fields)
    await conn.execute(
        """INSERT INTO audit.records (seq, at, service, actor, action, subject, model, version,
               before, after, reason, trace_id, prev_hash, hash)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb, $11, $12, $13, $14)""",
        fields["seq"],
        fields["at"],
        service,
        actor,
        action,
        subject,
        model,
        version,
        None if before is None else json.dumps(fields["before"]),
        None if after is None else json.dumps(fields["after"]),
        reason,
        fields["trace_id"],
        fields["prev_hash"],
        digest,
    )
    return int(fields["seq"])


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify` found."""

    records: int
    broken_at: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.broken_at is None


async def verify(conn: Conn) -> Verdict:
    """Walk the chain from the first record; the first broken link, if any."""
    prev, expected_seq, n = GENESIS, 1, 0
    async with conn.transaction():
        cursor = conn.cursor(
            "SELECT seq, at, service, actor, action, subject, model, version, before::text, "
            "after::text, reason, trace_id, prev_hash, hash FROM audit.records ORDER BY seq"
        )
        async for row in cursor:
            n += 1
            fields = dict(row)
            for key in ("before", "after"):  # jsonb reads back as its text
                if fields[key] is not None:
                    fields[key] = json.loads(fields[key])
            if fields["seq"] != expected_seq:
                return Verdict(n, fields["seq"], f"record {expected_seq} is missing")
            if fields["prev_hash"] != prev:
                return Verdict(
                    n, fields["seq"], "its prev_hash is not the hash of the record before"
                )
            if record_hash(fields) != fields["hash"]:
                return Verdict(n, fields["seq"], "its content does not match its hash")
            prev, expected_seq = fields["hash"], expected_seq + 1
    return Verdict(n)


async def log(
    conn: Conn,
    *,
    model: str | None = None,
    version: str | None = None,
    since: datetime | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """Records, oldest first (filtered by model/version and time)."""
    rows = await conn.fetch(
        """SELECT * FROM audit.records
           WHERE ($1::text IS NULL OR model = $1) AND ($2::text IS NULL OR version = $2)
             AND ($3::timestamptz IS NULL OR at >= $3)
           ORDER BY seq DESC LIMIT $4""",
        model,
        version,
        since,
        limit,
    )
    out = []
    for r in reversed(rows):
        item = dict(r)
        item["at"] = item["at"].isoformat()
        for key in ("before", "after"):
            if item[key] is not None:
                item[key] = json.loads(item[key])
        out.append(item)
    return out
