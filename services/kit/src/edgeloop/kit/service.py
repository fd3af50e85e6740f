"""The runtime every edgeloop service is made of.

``Service`` wires a FastStream NATS broker, an asyncpg pool with the service's schema and
migrations, the outbox relay, durable pull consumers under the kit's acknowledgement
policy, OpenTelemetry, and a health/metrics endpoint. Pools and connections are created in
the lifespan, never at import time. SIGTERM stops fetching, lets in-flight handlers finish
(``graceful_timeout``), then stops the relay and closes the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
from faststream import AckPolicy, Context, FastStream, StreamMessage
from faststream.nats import JStream, PullSub
from faststream.nats.message import NatsBatchMessage as _NatsBatchMessage
from nats.js import JetStreamContext

from edgeloop.contracts.access import SERVICES as SERVICE_ACCESS
from edgeloop.contracts.access import inbox_prefix
from edgeloop.contracts.events import Event
from edgeloop.kit import audit, compat, failpoints
from edgeloop.kit.bus import (
    ConsumerSpec,
    await_topology,
    declare_consumer,
    declare_topology,
    make_broker,
)
from edgeloop.kit.consumer import DeadLetters, EventProcessor, Handler, Malformed
from edgeloop.kit.db import create_pool, migrate, read_migrations
from edgeloop.kit.http import HealthServer
from edgeloop.kit.outbox import OutboxRelay
from edgeloop.kit.partitions import Partitioned, PartitionedConsumer, default_owner
from edgeloop.kit.retention import prune
from edgeloop.kit.settings import ServiceSettings
from edgeloop.kit.supervise import Loops
from edgeloop.kit.tracing import setup_tracing

log = logging.getLogger(__name__)

compat.apply()

E = TypeVar("E", bound=Event)

NatsBatchMessage = Annotated[_NatsBatchMessage, Context("message")]

Background = Callable[["Service"], Coroutine[Any, Any, None]]


class Service:
    """One edgeloop service process.

    Example::

        svc = Service("builder", BuilderSettings(), migrations=Path(__file__).parent / "sql")

        @svc.consume(ModelCommitted, ConsumerSpec(STREAM_LIFECYCLE, "builder", (MODEL_COMMITTED,)))
        async def on_model_committed(event: ModelCommitted, tx: Tx) -> None:
            ...  # state change via tx.conn, events via tx.publish(...)

        asyncio.run(svc.run())
    """

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        *,
        schema: str | None = None,
        migrations: Path | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.schema = schema or name.replace("-", "_")
        self.migrations = migrations
        self.tracer_provider = setup_tracing(
            name, settings.otlp_endpoint, trace_sql=settings.trace_sql
        )
        self.broker = make_broker(
            settings.nats_url,
            tracer_provider=self.tracer_provider,
            graceful_timeout=settings.graceful_timeout,
            name=name,
            user=settings.nats_user,
            password=settings.nats_password.get_secret_value() if settings.nats_password else None,
        )
        # a user's pull subscriptions take their replies on its own inbox prefix too
        user = settings.nats_user
        self._inbox_prefix = f"{inbox_prefix(user)}.".encode() if user else b"_INBOX."
        self.app = FastStream(self.broker)
        """The FastStream app (AsyncAPI docs); lifecycle is :meth:`start`/:meth:`stop`."""
        self._pool: asyncpg.Pool | None = None
        self._js: JetStreamContext | None = None
        self._relay: OutboxRelay | None = None
        self._specs: list[ConsumerSpec] = []
        self._background: list[Background] = []
        self.partitioned: list[PartitionedConsumer] = []
        """The partitioned consumers running in this replica (their ``owned`` partitions)."""
        self.loops = Loops(
            max_failures=settings.loop_max_failures, stable_after=settings.loop_stable_seconds
        )
        """Every long-running task of this process, supervised (see :mod:`.supervise`)."""
        self.health = HealthServer(
            settings.http_host,
            settings.http_port,
            {
                "postgres": self._check_postgres,
                "nats": self._check_nats,
                "loops": self._check_loops,
            },
        )
        self.ready = asyncio.Event()

    # --- wiring ---------------------------------------------------------------------

    @property
    def pool(self) -> asyncpg.Pool:
        """The service's PostgreSQL pool (available once started)."""
        if self._pool is None:
            raise RuntimeError(f"{self.name}: the pool exists only while the service runs")
        return self._pool

    @property
    def js(self) -> JetStreamContext:
        """JetStream context of the broker's connection (available once started)."""
        if self._js is None:
            raise RuntimeError(f"{self.name}: JetStream exists only while the service runs")
        return self._js

    def consume(
        self, event_type: type[E], spec: ConsumerSpec
    ) -> Callable[[Handler[E]], Handler[E]]:
        """Register ``handler`` for ``event_type`` on a durable pull consumer."""

        def register(handler: Handler[E]) -> Handler[E]:
            processor = self._processor(event_type, handler, spec)
            subscriber = self.broker.subscriber(
                spec.filter_subjects[0],
                stream=JStream(spec.stream, declare=False),
                durable=spec.durable,
                pull_sub=PullSub(batch_size=spec.batch_size, timeout=spec.max_wait, batch=True),
                ack_policy=AckPolicy.MANUAL,
                title=f"{spec.durable}:{event_type.__name__}",
                inbox_prefix=self._inbox_prefix,
                decoder=_undecoded,
            )

            async def on_message(message: NatsBatchMessage) -> None:
                await processor.process_batch(message.raw_message)

            on_message.__name__ = f"on_{handler.__name__.removeprefix('on_')}"
            subscriber(on_message)
            self._specs.append(spec)
            return handler

        return register

    def consume_partitioned(
        self,
        event_type: type[E],
        partitioned: Partitioned,
        *,
        owner: str | None = None,
        on_malformed: Malformed | None = None,
    ) -> Callable[[Handler[E]], Handler[E]]:
        """Register ``handler`` for ``event_type`` on a partitioned consumer: this
        replica consumes its share of the partitions (see :mod:`edgeloop.kit.partitions`)."""

        def register(handler: Handler[E]) -> Handler[E]:
            self._specs.extend(partitioned.partition_spec(k) for k in range(partitioned.count))

            async def partitions(svc: Service) -> None:
                consumer = PartitionedConsumer(
                    partitioned,
                    lambda spec: self._processor(event_type, handler, spec, on_malformed),
                    svc.pool,
                    svc.js,
                    owner or default_owner(),
                    svc.loops,
                )
                self.partitioned.append(consumer)
                try:
                    await consumer.run()
                finally:
                    self.partitioned.remove(consumer)

            partitions.__name__ = f"partitions-{partitioned.spec.durable}"
            self._background.append(partitions)
            return handler

        return register

    def _processor(
        self,
        event_type: type[E],
        handler: Handler[E],
        spec: ConsumerSpec,
        on_malformed: Malformed | None = None,
    ) -> EventProcessor[E]:
        return EventProcessor(
            on_malformed=on_malformed,
            event_type=event_type,
            handler=handler,
            spec=spec,
            schema=self.schema,
            pool=lambda: self.pool,
            dead_letters=lambda: DeadLetters(
                self.js, max_payload=lambda: self.broker.connection.max_payload
            ),
            tracer_provider=self.tracer_provider,
            nats_connected=self._nats_connected,
        )

    def _nats_connected(self) -> bool:
        return self._js is not None and bool(self.broker.connection.is_connected)

    def background(self, task: Background) -> Background:
        """Run ``task(service)`` once the service is ready, supervised (restarted with
        back-off when it fails or returns); cancelled at shutdown."""
        self._background.append(task)
        return task

    def spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``factory()`` as a supervised loop of this process (a sweep, an API server,
        a watch): restarted with back-off when it fails, and ``/readyz`` fails while it
        stays dead. Cancelled at shutdown."""
        self.loops.spawn(name, factory)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, migrate, declare, then start consuming, relaying and serving health."""
        s = self.settings
        failpoints.load()
        if s.audit_key is not None:  # one key per installation: process-wide
            audit.configure(s.audit_key.get_secret_value())
        self._pool = await create_pool(
            s.database_dsn(), self.schema, min_size=s.db_pool_min, max_size=s.db_pool_max
        )
        await migrate(self._pool, self.schema, read_migrations(self.migrations))
        await self.broker.connect()
        self._js = self.broker.config.connection_state.stream
        self._check_durables()
        if s.nats_user:  # a service's own user looks at the topology, the bootstrap makes it
            await await_topology(self._js)
        else:  # a connection with every right (development, tests): declare it here
            await declare_topology(self._js, replicas=s.nats_replicas)
        for spec in self._specs:
            await declare_consumer(self._js, spec)
        self._relay = OutboxRelay(
            self._pool,
            self.schema,
            self._js,
            batch=s.relay_batch,
            poll_seconds=s.relay_poll_seconds,
        )
        self._relay.start()  # it retries every failure itself; /readyz sees it alive
        await self.broker.start()
        await self.health.start()
        for task in self._background:
            self.loops.spawn(task.__name__, functools.partial(task, self))
        if s.retention_seconds > 0:
            self.loops.spawn("retention", self._prune_forever)
        self.ready.set()
        log.info("%s ready; health on http://%s:%d", self.name, s.http_host, self.health.port)

    def _check_durables(self) -> None:
        """A service's NATS user may bind only to the durables ``contracts.access`` lists
        for it: say so at start rather than let the server refuse them one by one."""
        access = SERVICE_ACCESS.get(self.settings.nats_user or "")
        if access is None:
            return
        unknown = sorted({spec.durable for spec in self._specs} - set(access.durables))
        if unknown:
            raise RuntimeError(
                f"{self.name}: durable consumers {', '.join(unknown)} are not among the "
                f"durables edgeloop.contracts.access grants user {self.settings.nats_user!r}; "
                "add them there (the server refuses any other)"
            )

    async def stop(self) -> None:
        """Stop fetching, let in-flight handlers finish, flush the relay, close the pool."""
        self.ready.clear()
        await self.loops.stop()
        await self.broker.stop()
        if self._relay is not None:
            await self._relay.stop()
            self._relay = None
        await self.health.stop()
        if self.tracer_provider is not None:  # what is still buffered goes out
            await asyncio.to_thread(self.tracer_provider.force_flush, 5000)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._js = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Service]:
        """Run for the duration of a ``with`` block (tests, embedding)."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def run(self) -> None:
        """Run until SIGINT/SIGTERM, then shut down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        dead = False
        try:
            signalled = asyncio.create_task(stop.wait())
            died = asyncio.create_task(self._dead_for(self.settings.loop_exit_seconds))
            await asyncio.wait({signalled, died}, return_when=asyncio.FIRST_COMPLETED)
            dead = died.done()
            for waiter in (signalled, died):
                waiter.cancel()
            if dead:
                log.critical(
                    "%s: a loop stayed dead for %.0f s (%s); exiting so the process is restarted",
                    self.name,
                    self.settings.loop_exit_seconds,
                    (await self.loops.check())[1],
                )
            else:
                log.info("%s: signal received, shutting down gracefully", self.name)
        finally:
            await self.stop()
        if dead:
            raise SystemExit(EXIT_LOOP_DEAD)

    async def _dead_for(self, seconds: float) -> None:
        """Return once some loop has been dead for ``seconds`` without reviving."""
        while True:
            await self.loops.dead.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._revived(), seconds)
                continue
            return

    async def _revived(self) -> None:
        while self.loops.dead.is_set():
            await asyncio.sleep(0.5)

    async def _prune_forever(self) -> None:
        """Delete inbox and sent outbox rows older than the retention, every so often."""
        s = self.settings
        while True:
            await prune(self.pool, self.schema, s.retention_seconds)
            await asyncio.sleep(s.prune_every_seconds)

    # --- readiness ----------------------------------------------------------------------

    async def _check_postgres(self) -> tuple[bool, str]:
        if self._pool is None:
            return False, "not started"
        async with self._pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")
        return True, ""

    async def _check_loops(self) -> tuple[bool, str]:
        if self._relay is not None and not self._relay.alive:
            return False, "the outbox relay stopped"
        return await self.loops.check()

    async def _check_nats(self) -> tuple[bool, str]:
        if self._js is None:
            return False, "not started"
        nc = self.broker.connection
        if not nc.is_connected:
            return False, "disconnected"
        return True, ""


async def _undecoded(message: StreamMessage[Any]) -> None:
    """The kit parses each message itself (:class:`EventProcessor`): FastStream's own
    decoding of a batch would ``json.loads`` every payload first, and one it cannot decode
    (deep nesting; not JSON under a JSON content type) would fail the whole batch before
    the kit could dead-letter that one message."""


#: the exit status of a process whose supervised loop stayed dead
EXIT_LOOP_DEAD = 70


#: Libraries whose INFO lines are bookkeeping, not news: shown from WARNING on (all of
#: them when the service logs at DEBUG).
QUIET_AT_INFO = ("httpx", "httpcore")


def configure_logging(level: str) -> None:
    """Structured-enough logs: time, level, logger, trace id when there is one."""
    from edgeloop.kit.tracing import current_trace_id

    class _TraceFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.trace_id = current_trace_id() or "-"
            return True

    handler = logging.StreamHandler()
    handler.addFilter(_TraceFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s trace=%(trace_id)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx notes every request at INFO (a line per registry blob): kept for DEBUG
    quiet = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    for chatty in QUIET_AT_INFO:
        logging.getLogger(chatty).setLevel(quiet)
