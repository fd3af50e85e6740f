"""The kit's delivery guarantees, against a real nats-server (JetStream) and PostgreSQL.

Each test runs the sample service as a real process and, where the guarantee is about a
crash, makes it SIGKILL itself at a fail point inside the window the guarantee covers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from kit_helpers import SampleProcess, connect, scrape
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ArtifactRef, ModelCommitted
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import eventually, stream_messages
from edgeloop.kit import consumer as kc
from edgeloop.kit.bus import declare_topology
from edgeloop.kit.db import create_pool, migrate, read_migrations
from edgeloop.kit.outbox import MSG_ID_HEADER, add_event

SQL = Path(__file__).parent / "sample_sql"


def committed(subject_model: str, version: str = "1") -> ModelCommitted:
    return ModelCommitted(
        model=subject_model,
        version=version,
        repository="models/sample",
        model_artifact=ArtifactRef(digest="sha256:" + "0" * 64, size=1, media_type="x"),
    )


class Ctx:
    """Per-test names (schema, subjects, durable) and connections."""

    def __init__(self, unique: str, pool: asyncpg.Pool, js: JetStreamContext, env: dict[str, str]):
        self.unique = unique
        self.schema = f"t_{unique}"
        self.subject = f"model.t{unique}"
        self.emit_subject = f"image.t{unique}"
        self.durable = f"sample_{unique}"
        self.pool = pool
        self.js = js
        self.env = {
            **env,
            "EDGELOOP_SAMPLE_SCHEMA_NAME": self.schema,
            "EDGELOOP_SAMPLE_SUBJECT": self.subject,
            "EDGELOOP_SAMPLE_DURABLE": self.durable,
        }

    async def effects(self, event_id: uuid.UUID) -> int:
        return int(
            await self.pool.fetchval(
                f"SELECT count(*) FROM {self.schema}.effects WHERE event_id = $1", event_id
            )
        )

    async def publish(self, event: ModelCommitted | bytes) -> None:
        if isinstance(event, bytes):
            await self.js.publish(self.subject, event)
        else:
            await self.js.publish(
                self.subject, event.to_json(), headers={MSG_ID_HEADER: str(event.event_id)}
            )

    async def wait_consumer(self) -> None:
        """Wait until the service has declared its durable consumer (it is consuming)."""

        async def exists() -> bool:
            try:
                await self.js.consumer_info(s.STREAM_LIFECYCLE, self.durable)
            except NotFoundError:
                return False
            return True

        await eventually(exists, what=f"consumer {self.durable}")

    async def consumer_settled(self) -> bool:
        info = await self.js.consumer_info(s.STREAM_LIFECYCLE, self.durable)
        return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.fixture
async def ctx(nats_url: str, pg_dsn: str, unique: str, tmp_path: Path) -> AsyncIterator[Ctx]:
    nc, js = await connect(nats_url)
    await declare_topology(js)
    pool = await create_pool(pg_dsn, f"t_{unique}")
    await migrate(pool, f"t_{unique}", read_migrations(SQL))
    c = Ctx(
        unique,
        pool,
        js,
        {"EDGELOOP_NATS_URL": nats_url, "EDGELOOP_DATABASE_URL": pg_dsn},
    )
    c.tmp = tmp_path  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        await pool.close()
        await nc.close()


def sample(c: Ctx, **env: str) -> SampleProcess:
    return SampleProcess(c.tmp, {**c.env, **env})  # type: ignore[attr-defined]


async def _write_state_and_event(c: Ctx, event: ModelCommitted) -> None:
    """A producer's state change and its event, in one transaction (the outbox write)."""
    async with c.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            f"INSERT INTO {c.schema}.effects (event_id, model, version, deliveries) "
            "VALUES ($1, 'producer', '0', 0)",
            event.event_id,
        )
        await add_event(conn, c.schema, event, subject=c.subject)


async def _sent(c: Ctx, event_id: uuid.UUID) -> bool:
    return bool(
        await c.pool.fetchval(
            f"SELECT sent_at IS NOT NULL FROM {c.schema}.outbox WHERE event_id = $1", event_id
        )
    )


def _ids(msgs: list) -> list[str]:  # type: ignore[type-arg]
    return [m.headers.get(MSG_ID_HEADER, "") if m.headers else "" for m in msgs]


async def test_outbox_killed_between_commit_and_publish(ctx: Ctx) -> None:
    event = committed("outbox-before")
    await _write_state_and_event(ctx, event)
    # The relay dies just before it publishes: the committed event must not be lost.
    proc = sample(ctx, EDGELOOP_FAILPOINTS="relay.before_publish").start()
    assert proc.wait(60) == -signal.SIGKILL, proc.tail()
    assert await stream_messages(ctx.js, s.STREAM_LIFECYCLE, ctx.subject) == []
    assert not await _sent(ctx, event.event_id)

    proc = sample(ctx, EDGELOOP_SAMPLE_DURABLE=f"other_{ctx.unique}").start()
    try:
        await eventually(lambda: _sent(ctx, event.event_id), what="relay to publish after restart")
    finally:
        proc.terminate()
    msgs = await stream_messages(ctx.js, s.STREAM_LIFECYCLE, ctx.subject)
    assert _ids(msgs) == [str(event.event_id)]


async def test_outbox_killed_between_publish_and_mark_sent(ctx: Ctx) -> None:
    event = committed("outbox-after")
    await _write_state_and_event(ctx, event)
    proc = sample(ctx, EDGELOOP_FAILPOINTS="relay.after_publish").start()
    assert proc.wait(60) == -signal.SIGKILL, proc.tail()
    # Published, but the row still says unsent: the restarted relay sends it again ...
    assert len(await stream_messages(ctx.js, s.STREAM_LIFECYCLE, ctx.subject)) == 1
    assert not await _sent(ctx, event.event_id)

    proc = sample(ctx, EDGELOOP_SAMPLE_DURABLE=f"other_{ctx.unique}").start()
    try:
        await eventually(lambda: _sent(ctx, event.event_id), what="relay to re-publish")
    finally:
        proc.terminate()
    # ... and the stream's duplicate window keeps one copy.
    msgs = await stream_messages(ctx.js, s.STREAM_LIFECYCLE, ctx.subject)
    assert _ids(msgs) == [str(event.event_id)]


async def test_same_event_published_twice_is_stored_once(ctx: Ctx) -> None:
    event = committed("twice")
    await ctx.publish(event)
    await ctx.publish(event)
    async with ctx.pool.acquire() as conn, conn.transaction():
        await add_event(conn, ctx.schema, event, subject=ctx.subject)
        await add_event(conn, ctx.schema, event, subject=ctx.subject)
    rows = await ctx.pool.fetchval(
        f"SELECT count(*) FROM {ctx.schema}.outbox WHERE event_id = $1", event.event_id
    )
    assert rows == 1
    proc = sample(ctx).start()
    try:
        await eventually(lambda: _sent(ctx, event.event_id), what="relay")
        await eventually(lambda: ctx.effects(event.event_id), what="effect")
        await eventually(ctx.consumer_settled, what="consumer to ack")
    finally:
        proc.terminate()
    msgs = await stream_messages(ctx.js, s.STREAM_LIFECYCLE, ctx.subject)
    assert _ids(msgs) == [str(event.event_id)]
    assert await ctx.effects(event.event_id) == 1


async def test_consumer_killed_after_commit_before_ack_has_one_effect(ctx: Ctx) -> None:
    event = committed("after-commit")
    proc = sample(
        ctx, EDGELOOP_FAILPOINTS="consumer.after_commit", EDGELOOP_SAMPLE_ACK_WAIT="1"
    ).start()
    try:
        await ctx.wait_consumer()
        await ctx.publish(event)
        assert await asyncio.to_thread(proc.wait, 60) == -signal.SIGKILL, proc.tail()
    finally:
        proc.kill()
    assert await ctx.effects(event.event_id) == 1  # committed, never acked

    port = free_port()
    proc = sample(ctx, EDGELOOP_SAMPLE_ACK_WAIT="1", EDGELOOP_SAMPLE_HTTP_PORT=str(port)).start()
    try:
        await eventually(ctx.consumer_settled, what="redelivery to be acked")
        # It really was delivered again, and the inbox recognised it.
        metrics = await eventually(
            lambda: scrape(port, f'consumer="{ctx.durable}",outcome="duplicate"'),
            what="duplicate outcome in /metrics",
        )
        assert metrics == 1.0
    finally:
        proc.terminate()
    assert await ctx.effects(event.event_id) == 1


async def _dlq(c: Ctx) -> list:  # type: ignore[type-arg]
    return await stream_messages(c.js, s.STREAM_DLQ, s.dlq_subject(c.subject))


async def test_malformed_payload_is_dead_lettered_and_consumer_goes_on(ctx: Ctx) -> None:
    good = committed("good")
    proc = sample(ctx).start()
    try:
        await ctx.wait_consumer()
        await ctx.publish(b"{not json")
        await ctx.publish(b'{"model": "x", "version": "1"}')  # misses required fields
        await ctx.publish(good)
        await eventually(lambda: ctx.effects(good.event_id), what="good event processed")
        dlq = await eventually(lambda: _ndlq(ctx, 2), what="two dead letters")
    finally:
        proc.terminate()
    reasons = [m.headers[kc.DLQ_REASON] for m in dlq]
    assert "malformed payload" in reasons[0] or "Invalid JSON" in reasons[0]
    assert "repository" in reasons[1]
    assert "Field required" in reasons[1]
    assert dlq[0].data == b"{not json"  # kept byte for byte, for replay
    assert all(m.headers[kc.DLQ_CONSUMER] == ctx.durable for m in dlq)
    assert all(m.headers[kc.DLQ_SUBJECT] == ctx.subject for m in dlq)


async def test_payloads_the_broker_cannot_decode_do_not_poison_their_batch(ctx: Ctx) -> None:
    """Found by the consumer fuzz: FastStream decoded every message of a fetched batch as
    JSON before the kit saw it, so one deeply nested payload (RecursionError) or a
    non-JSON one under a JSON content type failed the whole batch, over and over, until
    the server stopped delivering it: its good events were never processed, the bad ones
    never dead-lettered."""
    good = [committed("before"), committed("after")]
    deep = b"[" * 5000 + b"]" * 5000
    await ctx.publish(good[0])
    await ctx.publish(deep)
    await ctx.js.publish(ctx.subject, b"{not json", headers={"Content-Type": "application/json"})
    await ctx.publish(good[1])
    proc = sample(ctx).start()  # started after: the four come in one fetched batch
    try:
        for event in good:
            await eventually(lambda e=event: ctx.effects(e.event_id), what="good event processed")
        dlq = await eventually(lambda: _ndlq(ctx, 2), what="two dead letters")
    finally:
        proc.terminate()
    assert [m.data for m in dlq] == [deep, b"{not json"]
    reasons = [m.headers[kc.DLQ_REASON] for m in dlq]
    assert "recursion limit" in reasons[0]
    assert "Invalid JSON" in reasons[1]
    assert all(m.headers[kc.DLQ_DELIVERIES] == "1" for m in dlq)


async def test_events_without_an_id_or_with_a_nul_character_are_dead_lettered(
    ctx: Ctx,
) -> None:
    """Found by the consumer fuzz: an event without ``event_id`` parsed with a fresh
    default id (each redelivery a new event: the inbox could not keep its effect once),
    and a NUL character, which the contract takes and PostgreSQL never stores, was acked
    where the handler ignored the field (here ``trace_parent``) and retried to exhaustion
    where it stored it."""
    good = committed("good")
    body = json.loads(committed("no-id").to_json())
    del body["event_id"]
    await ctx.publish(json.dumps(body).encode())
    await ctx.publish(committed("nul").model_copy(update={"trace_parent": "00-\x00"}).to_json())
    await ctx.publish(good)
    proc = sample(ctx).start()
    try:
        await eventually(lambda: ctx.effects(good.event_id), what="good event processed")
        dlq = await eventually(lambda: _ndlq(ctx, 2), what="two dead letters")
    finally:
        proc.terminate()
    reasons = [m.headers[kc.DLQ_REASON] for m in dlq]
    assert "event_id: Field required" in reasons[0], reasons
    assert "trace_parent" in reasons[1], reasons
    assert "U+0000" in reasons[1], reasons
    assert all(m.headers[kc.DLQ_DELIVERIES] == "1" for m in dlq)
    assert int(await ctx.pool.fetchval(f"SELECT count(*) FROM {ctx.schema}.effects")) == 1


async def test_values_postgresql_refuses_are_dead_lettered_at_once(ctx: Ctx) -> None:
    """An integer beyond 64 bits (which the contract takes and no integer column does) is
    malformed at parse; a value the handler's statement cannot store (SQLSTATE class 22,
    the same at every attempt) is dead-lettered at its first delivery with PostgreSQL's
    reason, not retried to exhaustion as if it might succeed."""
    big = json.loads(committed("big").to_json())
    big["model_artifact"]["size"] = 1 << 64
    await ctx.publish(json.dumps(big).encode())
    await ctx.publish(committed("70000", version="as-smallint"))
    good = committed("good")
    await ctx.publish(good)
    proc = sample(ctx).start()
    try:
        await eventually(lambda: ctx.effects(good.event_id), what="good event processed")
        dlq = await eventually(lambda: _ndlq(ctx, 2), what="two dead letters")
    finally:
        proc.terminate()
    reasons = [m.headers[kc.DLQ_REASON] for m in dlq]
    assert "model_artifact.size: 18446744073709551616 does not fit in 64 bits" in reasons[0]
    assert "SQLSTATE 22003" in reasons[1], reasons
    assert "out of range" in reasons[1], reasons
    assert all(m.headers[kc.DLQ_DELIVERIES] == "1" for m in dlq), [m.headers for m in dlq]
    assert int(await ctx.pool.fetchval(f"SELECT count(*) FROM {ctx.schema}.effects")) == 1


async def test_a_malformed_event_as_large_as_the_server_takes_is_dead_lettered(
    ctx: Ctx,
) -> None:
    """Found by the consumer fuzz: the dead letter of an event near the server's
    max_payload (its payload plus the reason in headers) was larger than the server takes;
    the server dropped the service's connection at each try, the consumer took that for an
    outage and held the message forever, and nothing behind it was processed. The reason
    gives way first, then the payload's tail, which the dead letter says it lacks."""
    limit = ctx.js._nc.max_payload  # nats-py keeps a context's connection only privately
    extra = "".join(f', "unexpected_{i}": {i}' for i in range(12)).encode()
    head, tail = b'{"event_id": "', b'"' + extra + b"}"
    big = head + b"x" * (limit - 128 - len(head) - len(tail)) + tail
    good = committed("good")
    await ctx.publish(big)
    await ctx.publish(good)
    proc = sample(ctx).start()
    try:
        await eventually(lambda: ctx.effects(good.event_id), what="good event processed")
        (dead,) = await eventually(lambda: _ndlq(ctx, 1), what="a dead letter")
        assert await ctx.consumer_settled()
    finally:
        proc.terminate()
    reason = dead.headers[kc.DLQ_REASON]
    assert reason.startswith("malformed ModelCommitted: ")
    assert "unexpected_0: Extra inputs are not permitted" in reason
    size = len(dead.data) + sum(len(k) + len(v.encode()) + 4 for k, v in dead.headers.items())
    assert size <= limit
    if len(dead.data) < len(big):  # cut: the dead letter says so, and what it keeps is the head
        assert dead.headers[kc.DLQ_TRUNCATED] == str(len(big))
        assert big.startswith(dead.data)
        assert f"payload cut from {len(big)} bytes" in reason
    else:
        assert dead.data == big


async def _ndlq(c: Ctx, n: int) -> list | None:  # type: ignore[type-arg]
    msgs = await _dlq(c)
    return msgs if len(msgs) >= n else None


async def test_always_failing_handler_is_retried_then_dead_lettered(ctx: Ctx) -> None:
    poison = committed("bad", version="poison")
    invalid = committed("bad", version="invalid")
    good = committed("good")
    proc = sample(ctx, EDGELOOP_SAMPLE_MAX_DELIVER="3", EDGELOOP_SAMPLE_BACKOFF="0.3,0.6").start()
    try:
        await ctx.wait_consumer()
        await ctx.publish(poison)
        await ctx.publish(invalid)
        await ctx.publish(good)
        # The good event is not held up behind the poison one's retries.
        await eventually(lambda: ctx.effects(good.event_id), what="good event")
        assert not await _ndlq(ctx, 2)
        dlq = await eventually(lambda: _ndlq(ctx, 2), what="dead letters")
        await eventually(ctx.consumer_settled, what="consumer to settle")
    finally:
        proc.terminate()
    by_id = {m.headers[kc.DLQ_DELIVERIES]: m for m in dlq}
    assert set(by_id) == {"3", "1"}  # poison after 3 attempts; permanent error at once
    assert "failed 3 times" in by_id["3"].headers[kc.DLQ_REASON]
    assert "cannot handle bad@poison" in by_id["3"].headers[kc.DLQ_REASON]
    assert "PermanentError" in by_id["1"].headers[kc.DLQ_REASON]
    assert await ctx.effects(poison.event_id) == 0


async def test_sigterm_finishes_in_flight_work(ctx: Ctx) -> None:
    event = committed("graceful")
    proc = sample(ctx, EDGELOOP_SAMPLE_HANDLER_SLEEP="1.5").start()
    await ctx.wait_consumer()
    await ctx.publish(event)
    await asyncio.sleep(0.6)  # the handler is now sleeping inside its transaction
    assert await asyncio.to_thread(proc.terminate, 30) == 0, proc.tail()
    assert await ctx.effects(event.event_id) == 1
    assert await ctx.consumer_settled()


async def test_trace_context_travels_from_the_producer_to_the_consumer(ctx: Ctx) -> None:
    """outbox row → relay → NATS headers → FastStream's middleware → the handler."""
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    trace_id = int(uuid.uuid4().hex, 16)
    parent = SpanContext(
        trace_id=trace_id,
        span_id=0x1234,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        event = committed("traced")
        await _write_state_and_event(ctx, event)
    finally:
        context.detach(token)
    proc = sample(ctx).start()
    try:
        await eventually(lambda: _consumed(ctx, event.event_id), what="traced event handled")
    finally:
        proc.terminate()
    msgs = await stream_messages(ctx.js, s.STREAM_LIFECYCLE, ctx.subject)
    assert f"{trace_id:032x}" in msgs[0].headers["traceparent"]
    handled_under = await ctx.pool.fetchval(
        f"SELECT trace_id FROM {ctx.schema}.effects WHERE event_id = $1 AND deliveries > 0",
        event.event_id,
    )
    assert handled_under == f"{trace_id:032x}"


async def _consumed(c: Ctx, event_id: uuid.UUID) -> bool:
    return bool(
        await c.pool.fetchval(
            f"SELECT count(*) FROM {c.schema}.effects WHERE event_id = $1 AND deliveries > 0",
            event_id,
        )
    )
