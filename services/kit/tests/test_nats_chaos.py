"""Numbered events through the kit while the NATS cluster loses a node, again and again.

In the pattern of nats-server's own ``jetstream_chaos_test.go``: a 3-node cluster with R3
streams; while numbered events flow outbox → relay → stream → durable consumer (two
replicas of a consuming service sharing it, inbox and effect in one transaction), one
random node is SIGKILLed for 0-2 s every 1-3 s (seeded and printed:
``EDGELOOP_CHAOS_SEED`` repeats a run). At the end every number has exactly one effect,
the stream holds each event once and nothing was dead-lettered; what the transport
delivered twice (re-sent publishes the stream dropped, redeliveries the inbox absorbed)
is counted and printed.

The default run has 3,000 events; ``make chaos`` runs 30,000 (marker ``chaos``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from prometheus_client import REGISTRY
from test_guarantees import committed

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ModelCommitted
from edgeloop.devstack.servers import NatsCluster
from edgeloop.kit.bus import ConsumerSpec, declare_topology
from edgeloop.kit.consumer import Tx
from edgeloop.kit.outbox import MSG_ID_HEADER, add_event
from edgeloop.kit.service import Service
from edgeloop.kit.settings import ServiceSettings

#: events written to the outbox per transaction, and per second
PRODUCE_CHUNK = 50
PRODUCE_RATE = 300.0
CONSUMER_REPLICAS = 2


@dataclass
class Chaos:
    """Kills one random node for 0-2 s every 1-3 s until stopped."""

    cluster: NatsCluster
    seed: int
    kills: list[tuple[float, str, float]] = field(default_factory=list)
    """(seconds since start, node, seconds down) per kill."""

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed)
        started = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(1.0, 3.0))
            if stop.is_set():
                break
            node = rng.choice(self.cluster.nodes)
            down = rng.uniform(0.0, 2.0)
            self.kills.append((time.monotonic() - started, str(node.server_name), down))
            await asyncio.to_thread(node.kill)
            await asyncio.sleep(down)
            await asyncio.to_thread(node.start)


def _settings(cluster: NatsCluster, dsn: str) -> ServiceSettings:
    return ServiceSettings(
        nats_url=cluster.url,
        nats_replicas=3,
        database_url=dsn,
        relay_poll_seconds=0.2,
        graceful_timeout=5,
        log_level="WARNING",
    )


@contextlib.asynccontextmanager
async def _services(
    cluster: NatsCluster, dsn: str, run: str, subject: str
) -> AsyncIterator[tuple[Service, list[Service]]]:
    """The producing service (its outbox relay) and the consuming service's replicas."""
    producer = Service("chaos-producer", _settings(cluster, dsn), schema=f"chaos_{run}_p")
    spec = ConsumerSpec(
        s.STREAM_LIFECYCLE,
        f"chaos_{run}",
        (subject,),
        ack_wait=5.0,
        max_ack_pending=4096,
        batch_size=128,
    )
    consumers = []
    for replica in range(CONSUMER_REPLICAS):
        svc = Service(f"chaos-consumer-{replica}", _settings(cluster, dsn), schema=f"chaos_{run}_c")

        @svc.consume(ModelCommitted, spec)
        async def on_model_committed(event: ModelCommitted, tx: Tx) -> None:
            # no unique key: only the inbox keeps a redelivered event from counting twice
            await tx.conn.execute(
                "INSERT INTO effects (n, event_id, deliveries) VALUES ($1, $2, $3)",
                int(event.version),
                event.event_id,
                tx.deliveries,
            )

        consumers.append(svc)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(producer.running())
        for svc in consumers:
            await stack.enter_async_context(svc.running())
            await svc.pool.execute(
                """CREATE TABLE IF NOT EXISTS effects (
                    n integer NOT NULL, event_id uuid NOT NULL, deliveries integer NOT NULL)"""
            )
        yield producer, consumers


async def _produce(producer: Service, run: str, subject: str, total: int) -> None:
    """Commit ``total`` numbered events to the outbox, ``PRODUCE_RATE`` a second."""
    schema = producer.schema
    started = time.monotonic()
    for first in range(0, total, PRODUCE_CHUNK):
        async with producer.pool.acquire() as conn, conn.transaction():
            for n in range(first, min(first + PRODUCE_CHUNK, total)):
                await add_event(conn, schema, committed(f"chaos-{run}", str(n)), subject=subject)
        ahead = (first + PRODUCE_CHUNK) / PRODUCE_RATE - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _chaos_run(
    cluster: NatsCluster, dsn: str, total: int, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what Service.start's declare_topology reads (the settings' nats_replicas is not
    # handed to it)
    monkeypatch.setenv("EDGELOOP_NATS_REPLICAS", "3")
    seed = int(os.environ.get("EDGELOOP_CHAOS_SEED") or random.randrange(1 << 32))
    print(f"\nchaos seed {seed} (EDGELOOP_CHAOS_SEED={seed} repeats it), {total} events")
    run, subject = unique, f"model.chaos{unique}"
    durable = f"chaos_{run}"
    outcomes = ("processed", "duplicate", "retried", "dead_lettered")

    def handled() -> dict[str, float]:
        return {
            o: _sample("edgeloop_events_handled_total", {"consumer": durable, "outcome": o})
            for o in outcomes
        }

    before = handled()
    started = time.monotonic()
    async with _services(cluster, dsn, run, subject) as (producer, consumers):
        effects = f"{consumers[0].schema}.effects"
        stop = asyncio.Event()
        chaos = Chaos(cluster, seed)
        chaos_task = asyncio.create_task(chaos.run(stop))
        try:
            await _produce(producer, run, subject, total)
            produced = time.monotonic() - started
            deadline = time.monotonic() + 120 + total / 100
            while await producer.pool.fetchval(f"SELECT count(DISTINCT n) FROM {effects}") < total:
                assert not chaos_task.done() or chaos_task.exception() is None, chaos_task
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"not every event was processed: {await _summary(producer, effects)}"
                        f"\n{cluster.log_tail()}"
                    )
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await chaos_task
        elapsed = time.monotonic() - started
        await asyncio.to_thread(cluster.wait_healthy, 60)

        counts = await producer.pool.fetch(
            f"SELECT n, count(*) AS c FROM {effects} GROUP BY n HAVING count(*) <> 1"
        )
        assert not counts, f"numbers processed more than once: {counts[:20]}"
        numbers = await producer.pool.fetchval(
            f"SELECT count(*) FROM {effects} WHERE n >= 0 AND n < $1", total
        )
        assert numbers == total
        unsent = await producer.pool.fetchval(
            f"SELECT count(*) FROM {producer.schema}.outbox WHERE sent_at IS NULL"
        )
        assert unsent == 0
        redelivered = await producer.pool.fetchval(
            f"SELECT count(*) FROM {effects} WHERE deliveries > 1"
        )

        nc = await nats.connect(cluster.urls)
        try:
            js = nc.jetstream()
            info = await js.stream_info(s.STREAM_LIFECYCLE, subjects_filter=subject)
            assert info.config.num_replicas == 3
            consumer = await js.consumer_info(s.STREAM_LIFECYCLE, durable)
            assert consumer.cluster is not None
            assert len(consumer.cluster.replicas or []) == 2  # R3: a leader, two followers
            stored = (info.state.subjects or {}).get(subject, 0)
            dlq = await js.stream_info(s.STREAM_DLQ, subjects_filter=s.dlq_subject(subject))
            dead = sum((dlq.state.subjects or {}).values())
        finally:
            await nc.close()
        assert stored == total, f"the stream holds {stored} messages for {total} events"
        assert dead == 0, f"{dead} events were dead-lettered"

    after = handled()
    delta = {o: int(after[o] - before[o]) for o in outcomes}
    relay_dups = _sample("edgeloop_outbox_duplicates_total", {"schema": producer.schema})
    relay_errors = _sample("edgeloop_outbox_relay_errors_total", {"schema": producer.schema})
    print(
        f"chaos: {total} events, each processed once, in {elapsed:.1f}s "
        f"(produced in {produced:.1f}s); {len(chaos.kills)} node kills (seed {seed}); "
        f"transport duplicates absorbed: {relay_dups:.0f} re-sent publishes dropped by the "
        f"stream, {delta['duplicate']} redeliveries dropped by the inbox; "
        f"{redelivered} events first processed on a redelivery; relay rounds retried "
        f"{relay_errors:.0f}; consumer outcomes {delta}"
    )
    assert delta["dead_lettered"] == 0
    for at, node, down in chaos.kills:
        print(f"  t={at:6.1f}s kill {node} for {down:.2f}s")


async def _summary(producer: Service, effects: str) -> str:
    row = await producer.pool.fetchrow(
        f"""SELECT count(DISTINCT n) AS numbers, count(*) AS rows,
                   (SELECT count(*) FROM {producer.schema}.outbox WHERE sent_at IS NULL)
                       AS unsent
            FROM {effects}"""
    )
    return dict(row).__repr__() if row else "no rows"


async def test_topology_has_the_configured_replicas_and_survives_a_node_down(
    nats_cluster: NatsCluster, unique: str
) -> None:
    assert len(nats_cluster.nodes) == 3
    assert nats_cluster.url == ",".join(nats_cluster.urls)
    conf = nats_cluster.nodes[0].config_path.read_text()
    assert "sync_interval: always" in conf
    assert "cluster {" in conf
    subject = f"model.cluster{unique}"
    nc = await nats.connect(nats_cluster.urls, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        await declare_topology(js, replicas=1)
        assert (await js.stream_info(s.STREAM_LIFECYCLE)).config.num_replicas == 1
        await declare_topology(js, replicas=3)  # scaled up in place, buckets too
        for stream in (s.STREAM_LIFECYCLE, s.STREAM_DLQ, f"KV_{s.KV_DESIRED}"):
            assert (await js.stream_info(stream)).config.num_replicas == 3
        # scaling is live: until the new peers have caught up, the first node's copy is
        # the only one (losing it now would leave the stream without a leader)
        await _publish_eventually(js, subject, f"{unique}-1")
        await _replicas_current(js, s.STREAM_LIFECYCLE)
        down = nats_cluster.nodes[0]
        await asyncio.to_thread(down.kill)
        await _publish_eventually(js, subject, f"{unique}-2")  # after a leader election
        await asyncio.to_thread(down.start)  # same ports, same store
        await asyncio.to_thread(nats_cluster.wait_healthy, 60)
        info = await js.stream_info(s.STREAM_LIFECYCLE, subjects_filter=subject)
        assert (info.state.subjects or {}).get(subject) == 2
        assert info.cluster is not None
        assert len(info.cluster.replicas or []) == 2  # the leader's two followers
    finally:
        await nc.close()


async def _replicas_current(js: JetStreamContext, stream: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        cluster = (await js.stream_info(stream)).cluster
        peers = (cluster.replicas or []) if cluster else []
        if cluster and cluster.leader and len(peers) == 2 and all(p.current for p in peers):
            return
        assert time.monotonic() < deadline, f"{stream}'s replicas not current: {cluster}"
        await asyncio.sleep(0.2)


async def _publish_eventually(js: JetStreamContext, subject: str, msg_id: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await js.publish(subject, msg_id.encode(), headers={MSG_ID_HEADER: msg_id})
            return
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
            assert time.monotonic() < deadline, f"no stream leader for 30 s ({msg_id})"
            await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "total",
    [
        pytest.param(3_000, marks=pytest.mark.timeout(300), id="short"),
        # `make chaos`; deselected otherwise (addopts: -m 'not chaos')
        pytest.param(30_000, marks=[pytest.mark.chaos, pytest.mark.timeout(1200)], id="full"),
    ],
)
async def test_nats_chaos(
    nats_cluster: NatsCluster,
    pg_dsn: str,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    total: int,
) -> None:
    """Numbered events, each processed once, while NATS nodes die."""
    await _chaos_run(nats_cluster, pg_dsn, total, unique, monkeypatch)
