"""Events/s through the kit's full exactly-once path, against raw nats-py in the same run.

Kit path: a producer commits a state change + outbox row per event (one transaction
each) → the outbox relay publishes with Nats-Msg-Id → JetStream (sync_interval: always)
→ a durable pull consumer → inbox claim + effect in one transaction → ack.
Raw path: nats-py JetStream ``publish_async`` of the same payloads, then pull-consume
with explicit acks, on the same server. ``nats_url`` may name every node of a cluster
(comma separated); both paths then use the streams' replica count of
``EDGELOOP_NATS_REPLICAS``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from dataclasses import dataclass
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ArtifactRef, ModelCommitted
from edgeloop.kit.bus import ConsumerSpec, declare_topology
from edgeloop.kit.consumer import Tx
from edgeloop.kit.outbox import add_event
from edgeloop.kit.service import Service
from edgeloop.kit.settings import ServiceSettings

PRODUCER_CONCURRENCY = 16


@dataclass
class Result:
    """One measured path."""

    name: str
    events: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.events / self.seconds


def _event(i: int, run: str) -> ModelCommitted:
    return ModelCommitted(
        model=f"bench-{run}",
        version=str(i),
        repository="models/bench",
        model_artifact=ArtifactRef(digest="sha256:" + "1" * 64, size=1024, media_type="x"),
    )


def _settings(nats_url: str, dsn: str) -> ServiceSettings:
    return ServiceSettings(
        nats_url=nats_url,
        database_url=dsn,
        db_pool_max=20,
        relay_batch=512,
        relay_poll_seconds=0.2,
        log_level="WARNING",
    )


async def _consumer_service(nats_url: str, dsn: str, run: str, n: int) -> None:
    """The consuming service: inbox claim + effect per event, in its own process."""
    schema, subject = f"bench_{run}_c", f"model.bench{run}"
    svc = Service("bench-consumer", _settings(nats_url, dsn), schema=schema)

    @svc.consume(
        ModelCommitted,
        ConsumerSpec(s.STREAM_LIFECYCLE, f"bench_{run}", (subject,), max_ack_pending=4096),
    )
    async def on_model_committed(event: ModelCommitted, tx: Tx) -> None:
        await tx.conn.execute(
            "INSERT INTO effects (event_id, version) VALUES ($1, $2)", event.event_id, event.version
        )

    async with svc.running():
        await svc.pool.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.effects (event_id uuid, version text)"
        )
        await svc.pool.execute(f"NOTIFY bench_{run}_ready")
        while await svc.pool.fetchval(f"SELECT count(*) FROM {schema}.effects") < n:
            await asyncio.sleep(0.05)


async def _producer_service(nats_url: str, dsn: str, run: str, n: int) -> None:
    """The producing service: state change + outbox row per event, and its relay."""
    schema, subject = f"bench_{run}_p", f"model.bench{run}"
    svc = Service("bench-producer", _settings(nats_url, dsn), schema=schema)
    async with svc.running():
        await svc.pool.execute(f"CREATE TABLE IF NOT EXISTS {schema}.state (id uuid)")
        queue = [_event(i, run) for i in range(n)]
        await svc.pool.execute(f"NOTIFY bench_{run}_producing")

        async def producer() -> None:
            while queue:
                e = queue.pop()
                async with svc.pool.acquire() as conn, conn.transaction():
                    await conn.execute("INSERT INTO state (id) VALUES ($1)", uuid.uuid4())
                    await add_event(conn, schema, e, subject=subject)

        await asyncio.gather(*(producer() for _ in range(PRODUCER_CONCURRENCY)))
        while await svc.pool.fetchval(
            f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL"
        ):
            await asyncio.sleep(0.05)


async def _count(conn: Any, table: str) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))


def _run_in_process(fn: str, *args: Any) -> None:
    asyncio.run(globals()[fn](*args))


async def kit_path(nats_url: str, dsn: str, n: int) -> Result:
    """Produce ``n`` events through the outbox in one service process and consume them
    exactly once in another; timed from the first outbox write to the last effect."""
    import asyncpg

    run = uuid.uuid4().hex[:8]
    ctx = multiprocessing.get_context("spawn")
    conn = await asyncpg.connect(dsn)
    ready = asyncio.Event()
    await conn.add_listener(f"bench_{run}_ready", lambda *_: ready.set())
    # the clock starts at the producer's first outbox write, not at its process start
    # (importing and starting a service takes seconds on a loaded machine)
    producing: list[float] = []
    await conn.add_listener(
        f"bench_{run}_producing", lambda *_: producing.append(time.perf_counter())
    )
    consumer = ctx.Process(
        target=_run_in_process, args=("_consumer_service", nats_url, dsn, run, n)
    )
    consumer.start()
    await asyncio.wait_for(ready.wait(), 60)
    producer = ctx.Process(
        target=_run_in_process, args=("_producer_service", nats_url, dsn, run, n)
    )
    producer.start()
    deadline = time.monotonic() + 600
    while await _count(conn, f"bench_{run}_c.effects") < n:
        if time.monotonic() > deadline or consumer.exitcode not in (None, 0):
            raise RuntimeError(f"kit path did not finish: consumer exit code {consumer.exitcode}")
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - producing[0]
    await asyncio.to_thread(consumer.join, 60)
    await asyncio.to_thread(producer.join, 60)
    if consumer.exitcode != 0 or producer.exitcode != 0:
        raise RuntimeError(f"bench processes failed: {consumer.exitcode=} {producer.exitcode=}")
    got = await conn.fetchval(f"SELECT count(DISTINCT event_id) FROM bench_{run}_c.effects")
    dupes = await conn.fetchval(
        f"SELECT count(*) - count(DISTINCT event_id) FROM bench_{run}_c.effects"
    )
    for schema in (f"bench_{run}_c", f"bench_{run}_p"):
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    await conn.close()
    if got != n or dupes:
        raise RuntimeError(f"kit path: {got} of {n} effects, {dupes} duplicated")
    return Result("kit: outbox → relay → JetStream → consumer + inbox", n, elapsed)


async def raw_path(nats_url: str, n: int) -> Result:
    """Raw nats-py: publish_async the same payloads, then pull-consume with acks."""
    run = uuid.uuid4().hex[:8]
    subject = f"model.raw{run}"
    payloads = [_event(i, run).to_json() for i in range(n)]
    nc = await nats.connect(nats_url.split(","))
    js = nc.jetstream(publish_async_max_pending=4096)
    await declare_topology(js)
    sub = await js.pull_subscribe(
        subject,
        durable=f"raw_{run}",
        stream=s.STREAM_LIFECYCLE,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, max_ack_pending=4096
        ),
    )
    received = 0

    async def consume() -> None:
        nonlocal received
        while received < n:
            try:
                msgs = await sub.fetch(256, timeout=1)
            except TimeoutError:
                continue
            for m in msgs:
                await m.ack()
            received += len(msgs)

    started = time.perf_counter()
    consumer = asyncio.create_task(consume())
    futures: list[Any] = []
    for i, p in enumerate(payloads):
        futures.append(await js.publish_async(subject, p, headers={"Nats-Msg-Id": f"{run}-{i}"}))
    await asyncio.gather(*futures)
    await asyncio.wait_for(consumer, 600)
    elapsed = time.perf_counter() - started
    await js.delete_consumer(s.STREAM_LIFECYCLE, f"raw_{run}")
    await nc.close()
    return Result("raw nats-py: publish_async + pull/ack", n, elapsed)


async def run(nats_url: str, dsn: str, n: int = 5000) -> list[Result]:
    """Both paths, raw first, on the same servers."""
    raw = await raw_path(nats_url, n)
    kit = await kit_path(nats_url, dsn, n)
    return [raw, kit]


if __name__ == "__main__":
    import sys

    for r in asyncio.run(
        run(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 5000)
    ):
        print(f"{r.name:55s} {r.events:7d} events {r.seconds:7.2f}s {r.per_second:9.0f}/s")
