"""Bounded growth: old inbox and sent outbox rows are pruned, and pruning never lets a
copy of an event through that the inbox would have stopped."""

from __future__ import annotations

import uuid

import pytest
from test_guarantees import Ctx, committed, ctx, sample  # noqa: F401 (ctx is a fixture)

from edgeloop.devstack.testing import eventually
from edgeloop.kit.outbox import MSG_ID_HEADER, add_event
from edgeloop.kit.retention import MIN_RETENTION_SECONDS, prune
from edgeloop.kit.settings import ServiceSettings


def test_a_retention_shorter_than_the_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter than"):
        ServiceSettings(retention_seconds=60)
    assert ServiceSettings(retention_seconds=0).retention_seconds == 0  # keep everything
    assert ServiceSettings(retention_seconds=MIN_RETENTION_SECONDS).retention_seconds > 0


async def test_prune_deletes_old_processed_and_sent_rows_only(ctx: Ctx) -> None:  # noqa: F811
    sc = ctx.schema
    old, fresh = uuid.uuid4(), uuid.uuid4()
    await ctx.pool.execute(
        f"INSERT INTO {sc}.inbox (consumer, event_id, subject, processed_at) VALUES "
        "('c', $1, 's', now() - interval '30 days'), ('c', $2, 's', now())",
        old,
        fresh,
    )
    sent_old, unsent_old, sent_new = committed("a"), committed("b"), committed("c")
    async with ctx.pool.acquire() as conn, conn.transaction():
        for event in (sent_old, unsent_old, sent_new):
            await add_event(conn, sc, event, subject=ctx.subject)
    await ctx.pool.execute(
        f"UPDATE {sc}.outbox SET created_at = now() - interval '30 days', "
        "sent_at = now() - interval '30 days' WHERE event_id = $1",
        sent_old.event_id,
    )
    await ctx.pool.execute(
        f"UPDATE {sc}.outbox SET created_at = now() - interval '30 days' WHERE event_id = $1",
        unsent_old.event_id,
    )
    await ctx.pool.execute(
        f"UPDATE {sc}.outbox SET sent_at = now() WHERE event_id = $1", sent_new.event_id
    )
    counts = await prune(ctx.pool, sc, 7 * 86400)
    assert counts == {"inbox": 1, "outbox": 1}
    inbox = {r["event_id"] for r in await ctx.pool.fetch(f"SELECT event_id FROM {sc}.inbox")}
    assert inbox == {fresh}
    outbox = {r["event_id"] for r in await ctx.pool.fetch(f"SELECT event_id FROM {sc}.outbox")}
    assert outbox == {unsent_old.event_id, sent_new.event_id}  # never an unsent row


async def test_pruning_never_readmits_a_duplicate_inside_the_window(ctx: Ctx) -> None:  # noqa: F811
    event = committed("late-copy")
    proc = sample(ctx).start()
    try:
        await ctx.wait_consumer()
        await ctx.publish(event)
        await eventually(lambda: ctx.effects(event.event_id), what="the effect")
        # The most eager pruning there can be: a retention of 1 s asked for.
        await prune(ctx.pool, ctx.schema, 1)
        # A copy of the event arrives again (a relay re-send the stream let through: it
        # carries another message id), inside the duplicate window.
        await ctx.js.publish(
            ctx.subject, event.to_json(), headers={MSG_ID_HEADER: f"copy-{uuid.uuid4()}"}
        )
        await eventually(ctx.consumer_settled, what="the copy to be consumed")
    finally:
        proc.terminate()
    assert await ctx.effects(event.event_id) == 1
