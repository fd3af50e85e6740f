"""Outages are the platform's fault, not the message's (DESIGN §4a): PostgreSQL or NATS
down for longer than a message's whole retry budget dead-letters nothing; failed acks,
naks and dead-letter publishes lose nothing; a partition consumer that raises is
restarted, and one that stays dead turns ``/readyz`` red. Each test has its own servers
where it stops them (the session's are not disturbed)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from kit_helpers import SampleProcess, connect
from nats.js import JetStreamContext
from sample_app import SampleSettings
from test_guarantees import SQL, committed

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ModelCommitted
from edgeloop.devstack.servers import NatsServer, Postgres, free_port
from edgeloop.devstack.testing import eventually, stream_messages
from edgeloop.kit import failpoints
from edgeloop.kit.bus import ConsumerSpec, declare_topology
from edgeloop.kit.consumer import Tx
from edgeloop.kit.db import create_pool, migrate, read_migrations
from edgeloop.kit.outbox import MSG_ID_HEADER
from edgeloop.kit.partitions import Partitioned
from edgeloop.kit.service import Service

pytestmark = pytest.mark.slow


class Run:
    """The sample service as a process against given servers, and what it did."""

    def __init__(self, tmp: Path, nats_url: str, dsn: str, unique: str, **env: str) -> None:
        self.schema, self.subject, self.durable = f"o_{unique}", f"model.o{unique}", f"o_{unique}"
        self.nats_url, self.dsn = nats_url, dsn
        self.port = free_port()
        self.proc = SampleProcess(
            tmp,
            {
                "EDGELOOP_NATS_URL": nats_url,
                "EDGELOOP_DATABASE_URL": dsn,
                "EDGELOOP_SAMPLE_SCHEMA_NAME": self.schema,
                "EDGELOOP_SAMPLE_SUBJECT": self.subject,
                "EDGELOOP_SAMPLE_DURABLE": self.durable,
                "EDGELOOP_SAMPLE_HTTP_PORT": str(self.port),
                # the whole budget is spent in about a second: any outage would exhaust it
                "EDGELOOP_SAMPLE_MAX_DELIVER": "3",
                "EDGELOOP_SAMPLE_BACKOFF": "0.2,0.4",
                "EDGELOOP_SAMPLE_ACK_WAIT": "3",
                **env,
            },
        )

    async def setup(self) -> None:
        self.nc, self.js = await connect(self.nats_url)
        await declare_topology(self.js)
        self.pool = await create_pool(self.dsn, self.schema)
        await migrate(self.pool, self.schema, read_migrations(SQL))

    async def close(self) -> None:
        self.proc.kill()
        await self.pool.close()
        await self.nc.close()

    async def publish(
        self, n: int, tag: str, js: JetStreamContext | None = None
    ) -> list[uuid.UUID]:
        ids = []
        for i in range(n):
            event = committed(tag, version=str(i))
            await (js or self.js).publish(
                self.subject, event.to_json(), headers={MSG_ID_HEADER: str(event.event_id)}
            )
            ids.append(event.event_id)
        return ids

    async def handled_once(self, ids: list[uuid.UUID]) -> bool:
        try:
            rows = await self.pool.fetch(
                f"SELECT event_id, count(*) AS n FROM {self.schema}.effects "
                "WHERE event_id = ANY($1::uuid[]) GROUP BY event_id",
                ids,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        counts = {r["event_id"]: r["n"] for r in rows}
        assert all(n == 1 for n in counts.values()), f"an effect was doubled: {counts}"
        return len(counts) == len(ids)

    async def dead_letters(self) -> list[object]:
        return await stream_messages(self.js, s.STREAM_DLQ, s.dlq_subject(self.subject))

    async def ready(self) -> int:
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                return (await client.get(f"http://127.0.0.1:{self.port}/readyz")).status_code
        except httpx.HTTPError:
            return 0

    def alive(self) -> bool:
        assert self.proc.proc is not None
        return self.proc.proc.poll() is None


async def test_postgres_down_longer_than_the_budget_dead_letters_nothing(
    tmp_path: Path, nats_server: NatsServer, postgres_private: Postgres, unique: str
) -> None:
    run = Run(tmp_path, nats_server.url, postgres_private.create_database("outage"), unique)
    await run.setup()
    run.proc.start()
    try:
        first = await run.publish(10, "before")
        await eventually(lambda: run.handled_once(first), within=30, what="events before")
        await run.pool.close()
        await asyncio.to_thread(postgres_private.kill)
        during = await run.publish(30, "during")  # they arrive while PostgreSQL is down
        seen_not_ready = False
        until = time.monotonic() + 20  # far beyond 3 deliveries at 0.2 and 0.4 s
        while time.monotonic() < until:
            seen_not_ready = seen_not_ready or await run.ready() == 503
            await asyncio.sleep(1)
        assert seen_not_ready, "/readyz stayed ready while PostgreSQL was down"
        assert await run.dead_letters() == [], "an outage dead-lettered messages"
        await asyncio.to_thread(postgres_private.start)
        run.pool = await create_pool(run.dsn, run.schema)
        await eventually(
            lambda: run.handled_once(first + during),
            within=60,
            what=f"events after the outage (log:\n{run.proc.tail()})",
        )
        assert run.alive(), run.proc.tail()
        await eventually(lambda: _is(run.ready(), 200), what="/readyz ready again")
        assert await run.dead_letters() == []
    finally:
        await run.close()


async def test_nats_down_20s_loses_and_dead_letters_nothing(
    tmp_path: Path, nats_private: NatsServer, pg_dsn: str, unique: str
) -> None:
    run = Run(tmp_path, nats_private.url, pg_dsn, unique, EDGELOOP_SAMPLE_HANDLER_SLEEP="0.2")
    await run.setup()
    run.proc.start()
    try:
        ids = await run.publish(40, "nats")
        await eventually(lambda: _count(run, ids, 3), within=30, what="a few handled")
        await asyncio.to_thread(nats_private.kill)  # mid-batch: effects committed, acks lost
        seen_not_ready = False
        until = time.monotonic() + 20
        while time.monotonic() < until:
            seen_not_ready = seen_not_ready or await run.ready() == 503
            await asyncio.sleep(1)
        assert seen_not_ready, "/readyz stayed ready while NATS was down"
        await asyncio.to_thread(nats_private.start)
        await eventually(
            lambda: run.handled_once(ids), within=90, what=f"all events (log:\n{run.proc.tail()})"
        )
        assert run.alive(), run.proc.tail()
        assert await run.dead_letters() == []
    finally:
        await run.close()


async def test_failed_acks_naks_and_dead_letter_publishes_lose_nothing(
    tmp_path: Path, nats_server: NatsServer, pg_dsn: str, unique: str
) -> None:
    run = Run(
        tmp_path,
        nats_server.url,
        pg_dsn,
        unique,
        EDGELOOP_FAILPOINTS="consumer.ack=raise:3,consumer.nak=raise:2,consumer.dead_letter=raise:4",
    )
    await run.setup()
    run.proc.start()
    try:
        good = await run.publish(5, "good")
        poison = committed("bad", version="poison")  # fails every time: nak, nak, DLQ
        invalid = committed("bad", version="invalid")  # PermanentError: DLQ at once
        for event in (poison, invalid):
            await run.js.publish(
                run.subject, event.to_json(), headers={MSG_ID_HEADER: str(event.event_id)}
            )
        await eventually(lambda: run.handled_once(good), within=60, what="good events")
        dlq = await eventually(
            lambda: _at_least(run.dead_letters(), 2), within=90, what="both dead letters"
        )
        await asyncio.sleep(4)  # a second copy would come now (ack wait 3 s)
        dlq = await run.dead_letters()
        ids = sorted(ModelCommitted.model_validate_json(m.data).version for m in dlq)  # type: ignore[attr-defined]
        assert ids == ["invalid", "poison"], ids
        assert run.alive(), run.proc.tail()
        log = run.proc.log_path.read_text()
        for point in ("consumer.ack", "consumer.nak", "consumer.dead_letter"):
            assert f"fail point {point}" in log, f"{point} was never hit"
    finally:
        await run.close()


# --- partitions, in process -----------------------------------------------------------


@pytest.fixture
async def partitioned(
    nats_url: str, pg_dsn: str, unique: str
) -> AsyncIterator[tuple[Service, str, list[uuid.UUID]]]:
    settings = SampleSettings(
        nats_url=nats_url,
        database_url=pg_dsn,
        schema_name=f"p_{unique}",
        loop_max_failures=2,
    )
    svc = Service("sample", settings, schema=settings.schema_name, migrations=SQL)
    model = f"p{unique}"
    handled: list[uuid.UUID] = []
    spec = ConsumerSpec(
        stream=s.STREAM_TELEMETRY,
        durable=f"p_{unique}",
        filter_subjects=(f"device.telemetry.{model}.*.*",),
        ack_wait=5,
    )

    @svc.consume_partitioned(
        ModelCommitted,
        Partitioned(spec, s.TELEMETRY_PARTITIONS, lambda k: f"device.telemetry.{model}.*.{k}", 3),
    )
    async def on_event(event: ModelCommitted, tx: Tx) -> None:
        tx.after_commit(lambda: handled.append(event.event_id))

    async with svc.running():
        yield svc, model, handled
    failpoints.disarm("partitions.batch")


async def _publish_telemetry(js: JetStreamContext, model: str, n: int) -> list[uuid.UUID]:
    ids = []
    for i in range(n):
        event = committed(model, version=str(i))
        await js.publish(f"device.telemetry.{model}.dev{i % 4}", event.to_json())
        ids.append(event.event_id)
    return ids


async def test_partition_consumer_that_raises_is_restarted_and_keeps_flowing(
    partitioned: tuple[Service, str, list[uuid.UUID]],
) -> None:
    svc, model, handled = partitioned
    await eventually(lambda: _owns_all(svc), what="partitions claimed")
    failpoints.arm("partitions.batch", times=2)
    ids = await _publish_telemetry(svc.js, model, 20)
    await eventually(lambda: _all_in(ids, handled), within=60, what="every event handled")
    assert len(handled) == len(set(handled)) == 20
    restarts = sum(lp.restarts for lp in svc.loops.loops.values())
    assert restarts >= 2, "the failing partition was not restarted"
    ready, checks = await svc.health.readiness()
    assert ready, checks


async def test_partition_consumer_kept_dead_fails_readiness_and_gives_up_its_lease(
    partitioned: tuple[Service, str, list[uuid.UUID]],
) -> None:
    svc, model, _ = partitioned
    await eventually(lambda: _owns_all(svc), what="partitions claimed")
    failpoints.arm("partitions.batch", bug=True)  # every batch, until disarmed
    await _publish_telemetry(svc.js, model, 4)

    async def not_ready() -> str | None:
        ready, checks = await svc.health.readiness()
        return None if ready else checks["loops"]

    why = await eventually(not_ready, within=60, what="/readyz to fail on a dead loop")
    assert "dead after 2 failures" in why
    consumer = svc.partitioned[0]

    async def released() -> bool:
        rows = await svc.pool.fetch(
            "SELECT partition FROM partition_leases WHERE consumer = $1 AND owner = $2",
            consumer.name,
            consumer.owner,
        )
        return len(rows) < s.TELEMETRY_PARTITIONS

    await eventually(released, within=30, what="the dead partition's lease to be given up")


async def _is(value: object, expected: object) -> bool:
    return await value == expected  # type: ignore[misc]


async def _count(run: Run, ids: list[uuid.UUID], n: int) -> bool:
    got = await run.pool.fetchval(
        f"SELECT count(*) FROM {run.schema}.effects WHERE event_id = ANY($1::uuid[])", ids
    )
    return bool(got >= n)


async def _at_least(items: object, n: int) -> object:
    got = await items  # type: ignore[misc]
    return got if len(got) >= n else None


async def _owns_all(svc: Service) -> bool:
    return bool(svc.partitioned) and len(svc.partitioned[0].owned) == s.TELEMETRY_PARTITIONS


async def _all_in(ids: list[uuid.UUID], handled: list[uuid.UUID]) -> bool:
    return set(ids) <= set(handled)
