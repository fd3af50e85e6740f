"""Every SQL statement of the notifier: subscriptions, deliveries, attempts."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from edgeloop.kit.db import Conn

#: What the API shows of a subscription (never its secret).
_PUBLIC = (
    "subscription_id, url, events, format, description, created_at, created_by, "
    "removed_at, removed_by"
)


@dataclass(frozen=True)
class Due:
    """A delivery this replica holds (its lease) and is about to send."""

    delivery_id: uuid.UUID
    event: str
    body: bytes
    attempts: int
    """Attempts made before this one."""
    url: str
    secret: str


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: float


@dataclass(frozen=True)
class Target:
    """A subscription an event is delivered to."""

    subscription_id: uuid.UUID
    format: str


async def add_subscription(
    conn: Conn,
    *,
    url: str,
    events: list[str],
    secret: str,
    format: str,
    description: str,
    actor: str,
) -> dict[str, Any]:
    """A new subscription (its public fields)."""
    row = await conn.fetchrow(
        f"""INSERT INTO subscriptions (subscription_id, url, events, format, secret,
                                       description, created_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_PUBLIC}""",
        uuid.uuid4(),
        url,
        events,
        format,
        secret,
        description,
        actor,
    )
    assert row is not None
    return dict(row)


async def list_subscriptions(conn: Conn, *, removed: bool = False) -> list[dict[str, Any]]:
    """Subscriptions, oldest first (``removed``: the removed ones too)."""
    rows = await conn.fetch(
        f"""SELECT {_PUBLIC},
                   (SELECT count(*) FROM deliveries d
                     WHERE d.subscription_id = s.subscription_id AND d.status = 'pending')
                     AS pending,
                   (SELECT count(*) FROM deliveries d
                     WHERE d.subscription_id = s.subscription_id AND d.status = 'dead') AS dead
            FROM subscriptions s WHERE $1 OR removed_at IS NULL ORDER BY created_at""",
        removed,
    )
    return [dict(r) for r in rows]


async def get_subscription(conn: Conn, subscription_id: uuid.UUID) -> dict[str, Any] | None:
    """One subscription (public fields), removed or not."""
    row = await conn.fetchrow(
        f"SELECT {_PUBLIC} FROM subscriptions WHERE subscription_id = $1", subscription_id
    )
    return None if row is None else dict(row)


async def remove_subscription(
    conn: Conn, subscription_id: uuid.UUID, actor: str
) -> dict[str, Any] | None:
    """Mark a subscription removed and cancel its pending deliveries (its log stays);
    None when there is no such subscription still active."""
    row = await conn.fetchrow(
        f"""UPDATE subscriptions SET removed_at = now(), removed_by = $2
            WHERE subscription_id = $1 AND removed_at IS NULL RETURNING {_PUBLIC}""",
        subscription_id,
        actor,
    )
    if row is None:
        return None
    await conn.execute(
        """UPDATE deliveries SET status = 'cancelled', finished_at = now(),
                  last_error = 'the subscription was removed'
           WHERE subscription_id = $1 AND status = 'pending'""",
        subscription_id,
    )
    return dict(row)


async def targets(conn: Conn, event: str, occurred_at: datetime) -> list[Target]:
    """The active subscriptions to ``event`` that existed when it occurred."""
    rows = await conn.fetch(
        """SELECT subscription_id, format FROM subscriptions
           WHERE removed_at IS NULL AND $1 = ANY(events) AND created_at <= $2
           ORDER BY created_at""",
        event,
        occurred_at,
    )
    return [Target(r["subscription_id"], r["format"]) for r in rows]


async def add_delivery(
    conn: Conn,
    *,
    delivery_id: uuid.UUID,
    subscription_id: uuid.UUID,
    event_id: uuid.UUID,
    event: str,
    body: bytes,
) -> bool:
    """A pending delivery (at most one per subscription and event); whether it is new."""
    status = await conn.execute(
        """INSERT INTO deliveries (delivery_id, subscription_id, event_id, event, body)
           VALUES ($1, $2, $3, $4, $5) ON CONFLICT (subscription_id, event_id) DO NOTHING""",
        delivery_id,
        subscription_id,
        event_id,
        event,
        body,
    )
    return bool(status.endswith(" 1"))


class PgDeliveries:
    """The delivery worker's store (:class:`edgeloop.notifier.service.Deliveries`)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        self._pool = pool

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Due]:
        """Take a lease on up to ``limit`` due deliveries: pending, due, and not held by
        another live replica (this one's own leases are its to take again)."""
        rows = await self._pool().fetch(
            """UPDATE deliveries d
                  SET lease_owner = $1, lease_until = now() + make_interval(secs => $3)
                 FROM subscriptions s
                WHERE s.subscription_id = d.subscription_id
                  AND d.delivery_id IN (
                      SELECT delivery_id FROM deliveries
                       WHERE status = 'pending' AND next_attempt_at <= now()
                         AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $1)
                       ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED)
            RETURNING d.delivery_id, d.event, d.body, d.attempts, s.url, s.secret""",
            owner,
            limit,
            lease_seconds,
        )
        return [Due(**dict(r)) for r in rows]

    async def record(
        self,
        due: Due,
        owner: str,
        outcome: Outcome,
        *,
        retry_in: float,
        max_attempts: int,
    ) -> str | None:
        """Log the attempt and move the delivery on (delivered; pending again after
        ``retry_in`` s; dead after ``max_attempts`` — per round: a person's retry gives it
        another), if this replica still holds it;
        the delivery's new status (None: the lease was lost, nothing recorded)."""
        attempt = due.attempts + 1
        async with self._pool().acquire() as conn, conn.transaction():
            status: str | None = await conn.fetchval(
                """UPDATE deliveries SET
                       attempts = $3, lease_owner = NULL, lease_until = NULL, last_error = $4,
                       status = CASE WHEN $5 THEN 'delivered'
                                     WHEN $3 >= $6 * rounds THEN 'dead' ELSE 'pending' END,
                       next_attempt_at = CASE WHEN $5 OR $3 >= $6 * rounds THEN next_attempt_at
                                              ELSE now() + make_interval(secs => $7) END,
                       finished_at = CASE WHEN $5 OR $3 >= $6 * rounds THEN now() END
                   WHERE delivery_id = $1 AND lease_owner = $2 AND status = 'pending'
                     AND attempts = $3 - 1
                   RETURNING status""",
                due.delivery_id,
                owner,
                attempt,
                outcome.error,
                outcome.ok,
                max_attempts,
                retry_in,
            )
            if status is None:
                return None
            await conn.execute(
                """INSERT INTO attempts (delivery_id, attempt, status_code, error, duration_ms)
                   VALUES ($1, $2, $3, $4, $5)""",
                due.delivery_id,
                attempt,
                outcome.status_code,
                outcome.error,
                outcome.duration_ms,
            )
            return status

    async def prune(self, older_than_seconds: float) -> int:
        """Delete finished deliveries (delivered, dead, cancelled; their attempts with
        them) that finished more than ``older_than_seconds`` ago; how many."""
        status = await self._pool().execute(
            "DELETE FROM deliveries WHERE status <> 'pending' "
            "AND finished_at < now() - make_interval(secs => $1)",
            older_than_seconds,
        )
        return int(status.split()[-1])

    async def release(self, owner: str) -> None:
        """Give up this replica's leases (it stops): another may send them at once."""
        await self._pool().execute(
            "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL "
            "WHERE lease_owner = $1 AND status = 'pending'",
            owner,
        )


async def retry_delivery(conn: Conn, delivery_id: uuid.UUID) -> dict[str, Any] | None:
    """A dead delivery pending again, with another round of attempts (its log kept);
    None when there is no dead delivery of that id with an active subscription."""
    row = await conn.fetchrow(
        """UPDATE deliveries d SET status = 'pending', rounds = rounds + 1,
                  next_attempt_at = now(), finished_at = NULL
             FROM subscriptions s
            WHERE d.delivery_id = $1 AND d.status = 'dead'
              AND s.subscription_id = d.subscription_id AND s.removed_at IS NULL
        RETURNING d.delivery_id, d.subscription_id, d.event, d.attempts, d.last_error""",
        delivery_id,
    )
    return None if row is None else dict(row)


async def list_deliveries(
    conn: Conn,
    *,
    subscription_id: uuid.UUID | None,
    status: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Deliveries, newest first (never a body)."""
    rows = await conn.fetch(
        """SELECT delivery_id, subscription_id, event_id, event, status, attempts,
                  next_attempt_at, last_error, created_at, finished_at
           FROM deliveries
           WHERE ($1::uuid IS NULL OR subscription_id = $1) AND ($2::text IS NULL OR status = $2)
           ORDER BY created_at DESC, delivery_id LIMIT $3""",
        subscription_id,
        status,
        limit,
    )
    return [dict(r) for r in rows]


async def get_delivery(conn: Conn, delivery_id: uuid.UUID) -> dict[str, Any] | None:
    """One delivery with every attempt (and its body, as sent)."""
    row = await conn.fetchrow(
        """SELECT delivery_id, subscription_id, event_id, event, status, attempts,
                  next_attempt_at, last_error, created_at, finished_at, body
           FROM deliveries WHERE delivery_id = $1""",
        delivery_id,
    )
    if row is None:
        return None
    attempts = await conn.fetch(
        "SELECT attempt, at, status_code, error, duration_ms FROM attempts "
        "WHERE delivery_id = $1 ORDER BY attempt",
        delivery_id,
    )
    out = dict(row)
    out["body"] = bytes(out["body"]).decode(errors="replace")
    out["attempt_log"] = [dict(a) for a in attempts]
    return out
