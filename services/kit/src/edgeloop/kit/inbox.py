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
