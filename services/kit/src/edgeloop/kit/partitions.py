"""Partitioned consumers: a stream's subjects split into partitions, each consumed by one
replica at a time, and taken over when that replica goes away.

The stream maps every subject to a partition (a JetStream subject transform with
``partition(n, …)``, see :func:`edgeloop.kit.bus.default_topology`), so one subject —
one device's telemetry — always lands in the same partition and is consumed in order.
Each partition has its own durable consumer. Replicas share the partitions through
leases in PostgreSQL (the service's schema): every replica renews its membership,
works out its fair share (partitions / live replicas, rounded up), releases what it holds
beyond it and claims free or expired partitions up to it. A replica that dies stops
renewing; its partitions' leases run out and the others resume those durables where it
had acknowledged. Leases distribute the work; they are not what makes it exactly-once:
every event is still claimed in the inbox in the transaction of its effect, so two
replicas that briefly overlap during a takeover count nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from prometheus_client import Gauge

from edgeloop.kit import failpoints
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.consumer import EventProcessor
from edgeloop.kit.supervise import Loops, cancel_and_wait

log = logging.getLogger(__name__)

OWNED = Gauge("edgeloop_partitions_owned", "Partitions this replica consumes", ["consumer"])
#: with OWNED summed over the replicas: a partition nobody consumes (deploy/prometheus/)
PARTITIONS = Gauge("edgeloop_partitions", "Partitions the consumer is split into", ["consumer"])


def default_owner() -> str:
    """A replica's name: host, process and a random suffix (a restart is a new member)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Partitioned:
    """A consumer split into ``count`` partitions; ``spec`` is the template (its durable
    gets ``-<k>``, its filter is ``subject(k)``)."""

    spec: ConsumerSpec
    count: int
    subject: Callable[[int], str]
    lease_seconds: float = 15.0

    def partition_spec(self, k: int) -> ConsumerSpec:
        """The durable consumer of partition ``k``."""
        return replace(
            self.spec, durable=f"{self.spec.durable}-{k}", filter_subjects=(self.subject(k),)
        )


class PartitionedConsumer:
    """Runs one replica's share of a :class:`Partitioned` consumer."""

    def __init__(
        self,
        partitioned: Partitioned,
        processor: Callable[[ConsumerSpec], EventProcessor[Any]],
        pool: asyncpg.Pool,
        js: JetStreamContext,
        owner: str,
        loops: Loops | None = None,
    ) -> None:
        self.p = partitioned
        self.name = partitioned.spec.durable
        self.processor = processor
        self.pool = pool
        self.js = js
        self.owner = owner
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.loops = loops or Loops()
        """Each partition's consumer is a supervised loop: restarted when it fails, and
        its lease given up (not renewed) while it is dead."""
        self.shunned: dict[int, float] = {}  # dead here: not claimed again until then
        self.busy: set[int] = set()  # partitions applying a batch now
        self._idle = asyncio.Condition()  # notified when a partition's batch is applied

    @property
    def owned(self) -> list[int]:
        """The partitions this replica consumes now."""
        return sorted(self.tasks)

    async def run(self) -> None:
        """Balance and consume until cancelled; then release every partition held."""
        PARTITIONS.labels(self.name).set(self.p.count)
        async with self.pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO partition_leases (consumer, partition) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                [(self.name, k) for k in range(self.p.count)],
            )
        try:
            while True:
                try:
                    await self.balance()
                except (OSError, asyncpg.PostgresError) as exc:
                    log.warning("%s: balancing failed (%s); retrying", self.name, exc)
                await asyncio.sleep(self.p.lease_seconds / 3)
        finally:
            await self._shutdown()

    async def balance(self) -> None:
        """Renew membership and leases; give up what is beyond the fair share, claim up
        to it."""
        lease = self.p.lease_seconds
        now = asyncio.get_running_loop().time()
        for k in [k for k in self.tasks if self._dead(k)]:
            log.error("%s: partition %d's consumer is dead; giving its lease up", self.name, k)
            self.shunned[k] = now + 2 * lease
            await self._stop(k)
        self.shunned = {k: t for k, t in self.shunned.items() if t > now}
        alive = sorted(self.tasks)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute(
                    """INSERT INTO partition_members (consumer, owner, seen_until)
                       VALUES ($1, $2, now() + make_interval(secs => $3))
                       ON CONFLICT (consumer, owner)
                       DO UPDATE SET seen_until = EXCLUDED.seen_until""",
                    self.name,
                    self.owner,
                    lease,
                )
                await conn.execute(
                    "DELETE FROM partition_members WHERE consumer = $1 AND seen_until < now()",
                    self.name,
                )
                members = await conn.fetchval(
                    "SELECT count(*) FROM partition_members WHERE consumer = $1", self.name
                )
                share = math.ceil(self.p.count / max(members, 1))
                # only partitions whose consumer runs here keep their lease; any other
                # this owner holds (a consumer that died) is let go for another replica
                await conn.execute(
                    """UPDATE partition_leases SET owner = NULL, lease_until = NULL
                       WHERE consumer = $1 AND owner = $2 AND NOT partition = ANY($3::int[])""",
                    self.name,
                    self.owner,
                    alive,
                )
                held = await conn.fetch(
                    """UPDATE partition_leases SET lease_until = now() + make_interval(secs => $3)
                       WHERE consumer = $1 AND owner = $2 RETURNING partition""",
                    self.name,
                    self.owner,
                    lease,
                )
            mine = sorted(r["partition"] for r in held)
            lost = [k for k in self.tasks if k not in mine]
            for k in lost:
                log.warning("%s: lost the lease of partition %d", self.name, k)
            extra = mine[share:]
            await asyncio.gather(*(self._stop(k) for k in [*lost, *extra]))
            for k in extra:
                await conn.execute(
                    "UPDATE partition_leases SET owner = NULL, lease_until = NULL "
                    "WHERE consumer = $1 AND partition = $2 AND owner = $3",
                    self.name,
                    k,
                    self.owner,
                )
                log.info("%s: handed partition %d over (share %d)", self.name, k, share)
            mine = mine[:share]
            if len(mine) < share:
                claimed = await conn.fetch(
                    """UPDATE partition_leases SET owner = $2,
                           lease_until = now() + make_interval(secs => $3)
                       WHERE consumer = $1 AND partition IN (
                           SELECT partition FROM partition_leases
                           WHERE consumer = $1 AND (owner IS NULL OR lease_until < now())
                             AND NOT partition = ANY($5::int[])
                           ORDER BY partition LIMIT $4 FOR UPDATE SKIP LOCKED)
                       RETURNING partition""",
                    self.name,
                    self.owner,
                    lease,
                    share - len(mine),
                    sorted(self.shunned),
                )
                mine += [r["partition"] for r in claimed]
        for k in mine:
            if k not in self.tasks:
                self._start(k)
        OWNED.labels(self.name).set(len(self.tasks))

    def _loop_name(self, k: int) -> str:
        return f"{self.name}-{k}"

    def _dead(self, k: int) -> bool:
        task = self.tasks.get(k)
        return task is None or task.done() or self.loops.is_dead(self._loop_name(k))

    def _start(self, k: int) -> None:
        log.info("%s: consuming partition %d", self.name, k)
        self.tasks[k] = self.loops.spawn(self._loop_name(k), functools.partial(self._consume, k))

    async def _stop(self, k: int) -> None:
        """Stop consuming partition ``k``: at once when it is waiting for messages, after
        its current batch when it is applying one (an interrupted batch would only be
        redelivered, but there is no need)."""
        task = self.tasks.pop(k, None)
        if task is None:
            return
        async with self._idle:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._idle.wait_for(lambda: k not in self.busy), self.p.spec.ack_wait
                )
        await cancel_and_wait([task])
        self.loops.forget(self._loop_name(k))
        self.busy.discard(k)

    async def _consume(self, k: int) -> None:
        """Consume partition ``k`` while it is ours (run supervised: an exception that
        escapes restarts it; the batch in hand is nak'ed to come back at once)."""
        spec = self.p.partition_spec(k)
        processor = self.processor(spec)
        sub = await self.js.pull_subscribe_bind(spec.durable, stream=spec.stream)
        try:
            while True:  # until cancelled by _stop
                try:
                    msgs = await sub.fetch(spec.batch_size, timeout=1.0)
                except (TimeoutError, NatsTimeout):
                    continue
                except Exception as exc:  # the connection is reconnecting
                    log.warning("%s: fetch failed (%s)", spec.durable, exc)
                    await asyncio.sleep(1.0)
                    continue
                self.busy.add(k)
                try:
                    failpoints.hit("partitions.batch")
                    await processor.process_batch(msgs)
                except Exception:
                    for msg in msgs:
                        with contextlib.suppress(Exception):
                            await msg.nak()
                    raise
                finally:
                    self.busy.discard(k)
                    async with self._idle:
                        self._idle.notify_all()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _shutdown(self) -> None:
        for k in list(self.tasks):
            await self._stop(k)
        with contextlib.suppress(Exception):
            async with self.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE partition_leases SET owner = NULL, lease_until = NULL "
                    "WHERE consumer = $1 AND owner = $2",
                    self.name,
                    self.owner,
                )
                await conn.execute(
                    "DELETE FROM partition_members WHERE consumer = $1 AND owner = $2",
                    self.name,
                    self.owner,
                )
        OWNED.labels(self.name).set(0)
