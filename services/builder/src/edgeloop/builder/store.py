"""The builder's SQL: release counters (the builds rows are written by the handler)."""

from __future__ import annotations

from typing import Any


async def next_release(conn: Any, model: str) -> int:
    """The release counter the next build of ``model`` signs: one more than any before.

    Takes a per-model transaction lock, so concurrent builds of one model (several
    builders) number their releases one after the other; the number is kept only if
    the build's row commits.
    """
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"builder:release:{model}")
    return int(
        await conn.fetchval(
            "SELECT coalesce(max(release), 0) + 1 FROM builds WHERE model = $1", model
        )
    )
