"""Transactional outbox and its relay.

``add_event`` writes an event row in the caller's transaction, next to the state change
that causes it: both commit or neither. ``OutboxRelay`` publishes unsent rows to
JetStream with ``Nats-Msg-Id = event_id`` (so the stream's duplicate window drops a
re-send), then marks them sent. A relay killed between the publish and the mark
re-publishes on restart; the duplicate window and the consumers' inbox make that
harmless. Several relays (replicas) share the table through ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from nats.js import JetStreamContext
from nats.js.api import PubAck
from prometheus_client import Counter, Gauge

from edgeloop.contracts.events import Event
from edgeloop.kit import failpoints
from edgeloop.kit.db import TRANSIENT_DB_ERRORS, Conn, check_schema
from edgeloop.kit.supervise import cancel_and_wait
from edgeloop.kit.tracing import inject_headers

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
#: The relay's longest pause between failed rounds: a round is cheap, and a NATS cluster
#: electing a new stream leader answers again within a second or two.
RELAY_MAX_BACKOFF = 2.0

RELAYED = Counter("edgeloop_outbox_relayed_total", "Outbox events published", ["schema"])
RELAY_ERRORS = Counter("edgeloop_outbox_relay_errors_total", "Relay rounds that failed", ["schema"])
RELAY_DUPLICATES = Counter(
    "edgeloop_outbox_duplicates_total",
    "Re-sent outbox events the stream dropped as duplicates (Nats-Msg-Id seen before)",
    ["schema"],
)
UNSENT = Gauge("edgeloop_outbox_unsent", "Outbox rows not yet published (last seen)", ["schema"])


async def add_event(
    conn: Conn,
    schema: str,
    event: Event,
    *,
    subject: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Queue ``event`` for publishing, in the caller's transaction.

    The current trace context is stored with the row so the relay's publish continues
    the trace of the change that caused the event. Adding the same ``event_id`` twice is
    a no-op (the row is unique by event id).
    """
    if not conn.is_in_transaction():
        raise RuntimeError("add_event must run inside the transaction of the state change")
    hdrs = {**inject_headers(), **(headers or {})}
    await conn.execute(
        f"""INSERT INTO {check_schema(schema)}.outbox (event_id, subject, payload, headers)
            VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT (event_id) DO NOTHING""",
        event.event_id,
        subject or event.subject,
        event.to_json(),
        json.dumps(hdrs),
    )


class OutboxRelay:
    """Publishes a schema's outbox rows to JetStream, at least once, in order per relay."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        js: JetStreamContext,
        *,
        batch: int = 256,
        poll_seconds: float = 1.0,
        publish_timeout: float = 10.0,
        ack_stall_seconds: float = 3.0,
    ) -> None:
        self._pool = pool
        self._schema = check_schema(schema)
        self._js = js
        self._batch = batch
        self._poll = poll_seconds
        self._publish_timeout = publish_timeout
        self._ack_stall = ack_stall_seconds
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._listen_conn: PoolConnectionProxy | None = None

    async def publish_pending(self) -> int:
        """Publish up to one batch of unsent rows; return how many were published.

        Rows whose publish JetStream acknowledged are marked sent, the others stay for
        the next round. A round ends when every publish is answered, or when no answer
        has come for ``ack_stall_seconds`` (in a cluster, a publish proposed to a stream
        leader that then died is never answered: waiting longer only delays the re-send
        the new leader will take), or after ``publish_timeout`` in all.

        Raises:
            TimeoutError: some publishes were not answered (the others were marked sent).
            nats.js.errors.Error: JetStream refused a publish (e.g. no stream leader yet:
                "no response from stream"); the answered ones were marked sent.
        """
        s = self._schema
        failure: BaseException | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"""SELECT id, event_id, subject, payload, headers FROM {s}.outbox
                    WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED""",
                self._batch,
            )
            if not rows:
                return 0
            failpoints.hit("relay.before_publish")
            pending: dict[asyncio.Future[PubAck], int] = {}
            try:
                for row in rows:
                    headers: dict[str, str] = json.loads(row["headers"]) if row["headers"] else {}
                    headers[MSG_ID_HEADER] = str(row["event_id"])
                    future = await self._js.publish_async(
                        row["subject"], row["payload"], headers=headers
                    )
                    pending[future] = row["id"]
                sent, duplicates, failure = await self._answers(pending)
            finally:
                # Unanswered publishes must not keep their slots in the client's window of
                # pending publishes (a full window would block every later round).
                for future in pending:
                    future.cancel()
            failpoints.hit("relay.after_publish")
            if sent:
                await conn.execute(
                    f"UPDATE {s}.outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", sent
                )
        RELAYED.labels(s).inc(len(sent))
        if duplicates:
            RELAY_DUPLICATES.labels(s).inc(duplicates)
        if failure is not None:
            raise failure
        return len(sent)

    async def _answers(
        self, pending: dict[asyncio.Future[PubAck], int]
    ) -> tuple[list[int], int, BaseException | None]:
        """Wait for the publishes' acknowledgements (removing the answered ones from
        ``pending``): the ids acknowledged, how many of them were duplicates, and the
        first failure (a refusal, or the stall/overall timeout) if not every one was."""
        sent: list[int] = []
        duplicates = 0
        failure: BaseException | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._publish_timeout
        total = len(pending)
        while pending:
            left = deadline - loop.time()
            wait = min(self._ack_stall, max(left, 0.0))
            done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                why = (
                    f"after {self._publish_timeout:.1f}s"
                    if left <= self._ack_stall
                    else f"(no answer for {self._ack_stall:.1f}s)"
                )
                failure = TimeoutError(f"{len(pending)} of {total} publishes unacknowledged {why}")
                break
            for future in done:
                row_id = pending.pop(future)
                if (error := future.exception()) is not None:
                    failure = failure or error
                    continue
                sent.append(row_id)
                duplicates += bool(future.result().duplicate)
        return sent, duplicates, failure

    async def run(self) -> None:
        """Publish until stopped; survives NATS and PostgreSQL outages (retries)."""
        delay = 0.1
        while not self._stopping:
            try:
                await self._ensure_listener()
                published = await self.publish_pending()
                delay = 0.1
                if published == self._batch:
                    continue
                if published == 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll)
                    self._wake.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                RELAY_ERRORS.labels(self._schema).inc()
                log.warning(
                    "outbox relay (%s): %s: %s; retrying in %.1fs",
                    self._schema,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await self._drop_listener()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RELAY_MAX_BACKOFF)

    @property
    def alive(self) -> bool:
        """Whether the relay's task runs (it retries every failure; only a bug ends it)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Run in the background."""
        self._task = asyncio.create_task(self.run(), name=f"outbox-relay-{self._schema}")

    async def stop(self) -> None:
        """Finish the current batch, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            except TimeoutError:
                # cancelled mid-statement, asyncpg may answer with an error of its own (the
                # task's to keep); a cancellation lost under load is sent again
                await cancel_and_wait([self._task])
        await self._drop_listener()

    async def _ensure_listener(self) -> None:
        if self._listen_conn is not None:
            try:
                if not self._listen_conn.is_closed():
                    return
            except asyncpg.InterfaceError:
                pass  # the pool took the connection back when the server closed it
            await self._drop_listener()
        conn = await self._pool.acquire()
        try:
            await conn.add_listener(f"edgeloop_outbox_{self._schema}", self._on_notify)
        except BaseException:
            await self._pool.release(conn)
            raise
        self._listen_conn = conn

    async def _drop_listener(self) -> None:
        conn, self._listen_conn = self._listen_conn, None
        if conn is None:
            return
        # a relay cancelled mid-statement may leave the connection busy ("another
        # operation is in progress"): it is dropped, not an error of the stop
        broken: tuple[type[BaseException], ...] = (
            *TRANSIENT_DB_ERRORS,
            asyncpg.PostgresError,
            asyncpg.InternalClientError,
        )
        with contextlib.suppress(*broken):
            await conn.remove_listener(f"edgeloop_outbox_{self._schema}", self._on_notify)
        with contextlib.suppress(*broken):
            await self._pool.release(conn, timeout=2)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()
