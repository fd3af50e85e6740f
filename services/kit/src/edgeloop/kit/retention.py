"""Bounded growth: inbox rows and sent outbox rows are deleted after a retention.

An inbox row is what keeps a redelivered event from having a second effect. Deleting it
is safe once no copy of that event can arrive any more: a relay re-sends an outbox row
only until it is marked sent, the stream drops re-sends inside its duplicate window, and
a stream redelivers an unacknowledged message within its ack wait. The retention is
never less than :data:`MIN_RETENTION_SECONDS` — an hour, many times the longest of
those (the 2-minute duplicate window) — and defaults to 7 days, which also covers a consumer
or relay that was down for days.
"""

from __future__ import annotations

import logging

import asyncpg
from prometheus_client import Counter

from edgeloop.kit.bus import DUPLICATE_WINDOW_SECONDS
from edgeloop.kit.db import check_schema

log = logging.getLogger(__name__)

PRUNED = Counter("edgeloop_rows_pruned_total", "Inbox/outbox rows deleted by retention", ["table"])

#: an hour (30 duplicate windows): a pruned inbox row can never meet a copy the stream
#: let through, nor one held through an outage of that length
MIN_RETENTION_SECONDS = max(30 * DUPLICATE_WINDOW_SECONDS, 3600.0)
#: rows deleted per statement, so pruning never holds long locks
PRUNE_BATCH = 5000


async def prune(pool: asyncpg.Pool, schema: str, retention_seconds: float) -> dict[str, int]:
    """Delete inbox rows processed and outbox rows sent more than ``retention_seconds``
    ago (never less than :data:`MIN_RETENTION_SECONDS`); returns the counts."""
    keep = max(retention_seconds, MIN_RETENTION_SECONDS)
    sc = check_schema(schema)
    statements = {
        "inbox": f"""DELETE FROM {sc}.inbox WHERE ctid = ANY(ARRAY(
                         SELECT ctid FROM {sc}.inbox
                         WHERE processed_at < now() - make_interval(secs => $1) LIMIT $2))""",
        "outbox": f"""DELETE FROM {sc}.outbox WHERE id = ANY(ARRAY(
                          SELECT id FROM {sc}.outbox WHERE sent_at IS NOT NULL
                          AND sent_at < now() - make_interval(secs => $1) LIMIT $2))""",
    }
    counts: dict[str, int] = {}
    async with pool.acquire() as conn:
        for table, sql in statements.items():
            total = 0
            while True:
                status = await conn.execute(sql, float(keep), PRUNE_BATCH)
                n = int(status.split()[-1])
                total += n
                if n < PRUNE_BATCH:
                    break
            counts[table] = total
            if total:
                PRUNED.labels(table).inc(total)
                log.info("%s: pruned %d %s rows older than %.0f s", schema, total, table, keep)
    return counts
