"""Inbox de-duplication: a consumer's effect and the processed event id commit together."""

from __future__ import annotations

import uuid

from edgeloop.kit.db import Conn, check_schema


async def claim(conn: Conn, schema: str, consumer: str, event_id: uuid.UUID, subject: str) -> bool:
    """Record ``event_id`` as processed by ``consumer`` in the caller's transaction.

    Returns False when it was processed before (a redelivery): the caller then skips the
    effect. Concurrent deliveries of one event serialise on the primary key, so exactly
    one of them sees True.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("claim must run inside the transaction of the effect")
    status = await conn.execute(
        f"""INSERT INTO {check_schema(schema)}.inbox (consumer, event_id, subject)
            VALUES ($1, $2, $3) ON CONFLICT DO NOTHING""",
        consumer,
        event_id,
        subject,
    )
    return bool(status == "INSERT 0 1")


async def claim_many(
    conn: Conn, schema: str, consumer: str, events: list[tuple[uuid.UUID, str]]
) -> set[uuid.UUID]:
    """Claim several events at once; returns the ids claimed now (the others are repeats)."""
    if not conn.is_in_transaction():
        raise RuntimeError("claim_many must run inside the transaction of the effects")
    rows = await conn.fetch(
        f"""INSERT INTO {check_schema(schema)}.inbox (consumer, event_id, subject)
            SELECT $1, e.id, e.subject FROM unnest($2::uuid[], $3::text[]) AS e(id, subject)
            ON CONFLICT DO NOTHING RETURNING event_id""",
        consumer,
        [e for e, _ in events],
        [subj for _, subj in events],
    )
    return {r["event_id"] for r in rows}
