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

The hash alone has no key: whoever may write the table could change a record and
recompute every hash after it. So the chain is anchored outside the database: with an
audit key configured (:func:`configure`, from ``EDGELOOP_AUDIT_KEY``; the database never
holds it) each record also carries ``mac`` = HMAC-SHA256(key, hash), and :func:`verify`
with the key refuses a record whose MAC is missing or wrong. Services' database roles
may only insert and read the table (``edgeloop.kit.dbroles``), so rewriting history
needs the database's owner *and* the key.
"""

from __future__ import annotations

import hashlib
import hmac
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


_key: bytes | None = None


def configure(key: str | None) -> None:
    """Set the process's audit key (every service of an installation has the same one):
    records written from now on carry its MAC, and :func:`verify` checks them."""
    global _key
    _key = key.encode() if key else None


def record_mac(digest: str, key: bytes) -> str:
    """The HMAC-SHA256 (hex) of a record's hash under the audit key."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


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
               before, after, reason, trace_id, prev_hash, hash, mac)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb, $11, $12, $13, $14,
                   $15)""",
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
        record_mac(digest, _key) if _key else None,
    )
    return int(fields["seq"])


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify` found."""

    records: int
    broken_at: int | None = None
    problem: str | None = None
    keyed: bool = False
    """Whether the MACs were checked too (the verifier had the audit key)."""

    @property
    def ok(self) -> bool:
        return self.broken_at is None


async def verify(conn: Conn) -> Verdict:
    """Walk the chain from the first record; the first broken link, if any. With the audit
    key (:func:`configure`) every record's MAC must check out too."""
    secret, keyed = _key, _key is not None
    prev, expected_seq, n = GENESIS, 1, 0
    async with conn.transaction():
        cursor = conn.cursor(
            "SELECT seq, at, service, actor, action, subject, model, version, before::text, "
            "after::text, reason, trace_id, prev_hash, hash, mac FROM audit.records "
            "ORDER BY seq"
        )
        async for row in cursor:
            n += 1
            fields = dict(row)
            for key in ("before", "after"):  # jsonb reads back as its text
                if fields[key] is not None:
                    fields[key] = json.loads(fields[key])
            mac = fields.pop("mac")
            problem = None
            if fields["seq"] != expected_seq:
                problem = f"record {expected_seq} is missing"
            elif fields["prev_hash"] != prev:
                problem = "its prev_hash is not the hash of the record before"
            elif record_hash(fields) != fields["hash"]:
                problem = "its content does not match its hash"
            elif secret is not None and mac is None:
                problem = "it has no MAC (written without the audit key, or the MAC was removed)"
            elif secret is not None and not hmac.compare_digest(
                mac, record_mac(fields["hash"], secret)
            ):
                problem = "its MAC does not match: changed by someone without the audit key"
            if problem:
                return Verdict(n, fields["seq"], problem, keyed)
            prev, expected_seq = fields["hash"], expected_seq + 1
    return Verdict(n, keyed=keyed)


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
