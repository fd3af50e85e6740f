"""What an outage of PostgreSQL or NATS costs the kit's exactly-once path (issue 15).

A consumer service (its own process; max_deliver 3 with 0.2/0.4 s back-off, so any
outage would exhaust a budget that outages were charged to) applies numbered events
with the inbox. The benchmark publishes events straight to JetStream and, while they
flow, SIGKILLs PostgreSQL (or NATS) for ``outage`` seconds, then starts it again on the
same port and data. Reported per run: events lost, duplicated (effects applied twice)
and dead-lettered, and the time from the server being back to the backlog drained.
In the NATS runs the handler takes 10 ms an event (a backlog in hand when NATS goes),
so their drain cannot be shorter than the backlog left at recovery times 10 ms: each run
reports that floor beside the drain, and the summary the time over it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import nats

from bench.kit_throughput import _event
from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ModelCommitted
from edgeloop.devstack.servers import NatsServer, Postgres
from edgeloop.kit.bus import ConsumerSpec, declare_topology
from edgeloop.kit.consumer import Tx
from edgeloop.kit.service import Service
from edgeloop.kit.settings import ServiceSettings


async def _consumer(nats_url: str, dsn: str, run: str, handler_sleep: float) -> None:
    schema = f"out_{run}"
    settings = ServiceSettings(nats_url=nats_url, database_url=dsn, log_level="WARNING")
    svc = Service("bench-outage", settings, schema=schema)

    @svc.consume(
        ModelCommitted,
        ConsumerSpec(
            s.STREAM_LIFECYCLE,
            f"out_{run}",
            (f"model.out{run}",),
            max_deliver=3,
            backoff=(0.2, 0.4),
            ack_wait=5,
            batch_size=16,
        ),
    )
    async def on_event(event: ModelCommitted, tx: Tx) -> None:
        if handler_sleep:
            await asyncio.sleep(handler_sleep)
        await tx.conn.execute(
            "INSERT INTO effects (event_id, n) VALUES ($1, $2)", event.event_id, int(event.version)
        )

    async with svc.running():
        await asyncio.Event().wait()  # until the benchmark kills this process


def _run_consumer(*args: Any) -> None:
    asyncio.run(_consumer(*args))


async def _effects(dsn: str, schema: str) -> tuple[int, int]:
    """(distinct events applied, rows) — 0s while PostgreSQL is away."""
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return 0, 0
    try:
        row = await conn.fetchrow(
            f"SELECT count(DISTINCT event_id) AS d, count(*) AS n FROM {schema}.effects"
        )
        assert row is not None
        return int(row["d"]), int(row["n"])
    finally:
        await conn.close()


async def one_run(
    root: Path, fault: str, events: int, outage: float, nats_server: NatsServer, pg: Postgres
) -> dict[str, Any]:
    """One fault run on fresh names; ``fault`` is ``postgres`` or ``nats``."""
    run = uuid.uuid4().hex[:8]
    schema, subject = f"out_{run}", f"model.out{run}"
    dsn = pg.dsn("bench_outages")
    setup = await asyncpg.connect(dsn)
    await setup.execute(f"CREATE SCHEMA {schema}")
    await setup.execute(f"CREATE TABLE {schema}.effects (event_id uuid, n int)")
    await setup.close()
    sleep = 0.0 if fault == "postgres" else 0.01  # a backlog in hand when NATS goes
    proc = multiprocessing.get_context("spawn").Process(
        target=_run_consumer, args=(nats_server.url, dsn, run, sleep)
    )
    proc.start()
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    await declare_topology(js)
    try:
        half = events // 2
        for i in range(half):
            e = _event(i, run)
            await js.publish(subject, e.to_json(), headers={"Nats-Msg-Id": str(e.event_id)})
        # the consumer runs (it applied something) before the fault: what is measured is
        # its recovery, not its first connection
        while (await _effects(dsn, schema))[0] == 0:
            await asyncio.sleep(0.05)
        killed = pg.kill if fault == "postgres" else nats_server.kill
        await asyncio.to_thread(killed)
        if fault == "postgres":  # the rest arrives while PostgreSQL is down
            for i in range(half, events):
                e = _event(i, run)
                await js.publish(subject, e.to_json(), headers={"Nats-Msg-Id": str(e.event_id)})
        await asyncio.sleep(outage)
        await asyncio.to_thread(pg.start if fault == "postgres" else nats_server.start)
        back = time.monotonic()
        # (PostgreSQL just restarted may not answer yet: its runs have no handler floor)
        backlog = events - (await _effects(dsn, schema))[0] if fault == "nats" else 0
        if fault == "nats":  # the rest after NATS is back
            for i in range(half, events):
                e = _event(i, run)
                await js.publish(subject, e.to_json(), headers={"Nats-Msg-Id": str(e.event_id)})
        deadline = back + 300
        while (await _effects(dsn, schema))[0] < events and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        drained = time.monotonic() - back
        await asyncio.sleep(6)  # anything redelivered after the ack wait shows up now
        distinct, rows = await _effects(dsn, schema)
        dlq = await js.stream_info(s.STREAM_DLQ, subjects_filter=s.dlq_subject(subject))
        dead = sum((dlq.state.subjects or {}).values())
    finally:
        proc.kill()
        proc.join(10)
        await nc.close()
    return {
        "fault": fault,
        "outage_seconds": outage,
        "events": events,
        "lost": events - distinct,
        "duplicated": rows - distinct,
        "dead_lettered": dead,
        "drain_seconds": round(drained, 2),
        # the handler's own time for what was left: the drain cannot be shorter
        "backlog_at_recovery": backlog,
        "handler_floor_seconds": round(backlog * sleep, 2),
    }


async def run(root: Path, *, runs: int = 3, events: int = 2000, outage: float = 20.0) -> Any:
    """``runs`` PostgreSQL outages and ``runs`` NATS outages on servers of its own."""
    nats_server = NatsServer(root / "nats").start()
    pg = Postgres(root / "pg").start()
    pg.create_database("bench_outages")
    results: list[dict[str, Any]] = []
    try:
        for fault in ("postgres", "nats"):
            for i in range(runs):
                r = await one_run(root, fault, events, outage, nats_server, pg)
                print(f"{fault} run {i + 1}: {r}", flush=True)
                results.append(r)
    finally:
        pg.stop()
        nats_server.stop()
    summary: dict[str, Any] = {"benchmark": "outages", "runs": results}
    for fault in ("postgres", "nats"):
        drains = sorted(r["drain_seconds"] for r in results if r["fault"] == fault)
        over = sorted(
            round(r["drain_seconds"] - r["handler_floor_seconds"], 2)
            for r in results
            if r["fault"] == fault
        )
        summary[fault] = {
            "drain_seconds_min_median_max": [drains[0], drains[len(drains) // 2], drains[-1]],
            "drain_over_handler_floor_min_median_max": [over[0], over[len(over) // 2], over[-1]],
            "lost": sum(r["lost"] for r in results if r["fault"] == fault),
            "duplicated": sum(r["duplicated"] for r in results if r["fault"] == fault),
            "dead_lettered": sum(r["dead_lettered"] for r in results if r["fault"] == fault),
        }
    return summary
