"""NATS and PostgreSQL restarted under a running service: it reconnects, nothing is lost,
nothing is doubled. Each test has its own servers (the session's are not disturbed)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest
from kit_helpers import SampleProcess, connect
from test_guarantees import SQL, committed

from edgeloop.contracts import subjects as s
from edgeloop.devstack.servers import NatsServer, Postgres
from edgeloop.devstack.testing import eventually, stream_messages
from edgeloop.kit.bus import declare_topology
from edgeloop.kit.db import create_pool, migrate, read_migrations
from edgeloop.kit.outbox import MSG_ID_HEADER, add_event

pytestmark = pytest.mark.slow


async def _setup(dsn: str, schema: str) -> asyncpg.Pool:
    pool = await create_pool(dsn, schema)
    await migrate(pool, schema, read_migrations(SQL))
    return pool


async def _produce(pool: asyncpg.Pool, schema: str, subject: str, n: int) -> list[uuid.UUID]:
    """n committed state changes with their events (through the outbox)."""
    ids = []
    for i in range(n):
        event = committed("restart", version=str(i))
        async with pool.acquire() as conn, conn.transaction():
            await add_event(conn, schema, event, subject=subject)
        ids.append(event.event_id)
    return ids


async def _all_handled_once(pool: asyncpg.Pool, schema: str, ids: list[uuid.UUID]) -> bool:
    rows = await pool.fetch(
        f"SELECT event_id, count(*) AS n FROM {schema}.effects "
        "WHERE event_id = ANY($1::uuid[]) GROUP BY event_id",
        ids,
    )
    counts = {r["event_id"]: r["n"] for r in rows}
    assert all(n == 1 for n in counts.values()), f"an effect was doubled: {counts}"
    return len(counts) == len(ids)


async def _run_with_restart(
    tmp_path: Path, nats: NatsServer, dsn: str, restart: object, unique: str
) -> None:
    schema, subject = f"r_{unique}", f"model.r{unique}"
    nc, js = await connect(nats.url)
    await declare_topology(js)
    pool = await _setup(dsn, schema)
    proc = SampleProcess(
        tmp_path,
        {
            "EDGELOOP_NATS_URL": nats.url,
            "EDGELOOP_DATABASE_URL": dsn,
            "EDGELOOP_SAMPLE_SCHEMA_NAME": schema,
            "EDGELOOP_SAMPLE_SUBJECT": subject,
            "EDGELOOP_SAMPLE_DURABLE": f"r_{unique}",
            "EDGELOOP_SAMPLE_MAX_DELIVER": "20",
            "EDGELOOP_SAMPLE_BACKOFF": "0.5,1,2",
            "EDGELOOP_SAMPLE_ACK_WAIT": "5",
        },
    ).start()
    try:
        first = await _produce(pool, schema, subject, 20)
        await eventually(
            lambda: _all_handled_once(pool, schema, first), within=30, what="first batch"
        )
        await pool.close()
        await asyncio.to_thread(restart)  # type: ignore[arg-type]
        pool = await _setup(dsn, schema)
        second = await _produce(pool, schema, subject, 20)
        await eventually(
            lambda: _all_handled_once(pool, schema, first + second),
            within=60,
            what=f"events after the restart (service log:\n{proc.tail()})",
        )
        assert proc.proc is not None
        assert proc.proc.poll() is None, "the service died instead of reconnecting"
        stored = await stream_messages(js, s.STREAM_LIFECYCLE, subject)
        ids = [m.headers[MSG_ID_HEADER] for m in stored if m.headers]
        assert sorted(ids) == sorted(str(i) for i in first + second)  # each once
    finally:
        proc.kill()
        await pool.close()
        await nc.close()


async def test_nats_restart_mid_run(
    tmp_path: Path, nats_private: NatsServer, pg_dsn: str, unique: str
) -> None:
    await _run_with_restart(tmp_path, nats_private, pg_dsn, nats_private.restart, unique)


async def test_nats_crash_mid_run(
    tmp_path: Path, nats_private: NatsServer, pg_dsn: str, unique: str
) -> None:
    await _run_with_restart(
        tmp_path, nats_private, pg_dsn, lambda: nats_private.restart(hard=True), unique
    )


async def test_postgres_restart_mid_run(
    tmp_path: Path, nats_server: NatsServer, postgres_private: Postgres, unique: str
) -> None:
    dsn = postgres_private.create_database("restart")
    await _run_with_restart(tmp_path, nats_server, dsn, postgres_private.restart, unique)
