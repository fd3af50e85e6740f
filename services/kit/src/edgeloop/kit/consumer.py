"""The kit's acknowledgement policy: exactly-once effect on at-least-once delivery.

For every delivered message:
1. parse it into its contract model; malformed → dead-lettered at once with the error;
2. in one PostgreSQL transaction: claim the event id in the inbox (a redelivery finds it
   claimed and does nothing), run the handler (its state changes and the events it
   queues in the outbox), commit;
3. ack only after the commit;
4. on an error: ``PermanentError`` → dead-letter now; anything else → nak with the
   consumer's back-off, and dead-letter after ``max_deliver`` attempts. Nothing is ever
   dropped silently (FastStream's default would ack a message whose handler raised).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import Event
from edgeloop.kit import failpoints, inbox, outbox
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.db import Conn

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

HANDLED = Counter("edgeloop_events_handled_total", "Events by outcome", ["consumer", "outcome"])
HANDLE_SECONDS = Histogram(
    "edgeloop_event_handle_seconds", "Time from delivery to ack", ["consumer"]
)

DLQ_REASON = "Edgeloop-Dlq-Reason"
DLQ_SUBJECT = "Edgeloop-Dlq-Subject"
DLQ_CONSUMER = "Edgeloop-Dlq-Consumer"
DLQ_STREAM_SEQ = "Edgeloop-Dlq-Stream-Seq"
DLQ_DELIVERIES = "Edgeloop-Dlq-Deliveries"
_MAX_REASON = 4000


class PermanentError(Exception):
    """The event can never be processed (bad reference, violated invariant): dead-letter it
    now instead of retrying."""


@dataclass
class Tx:
    """What a handler gets: the open transaction and a way to queue events in it."""

    conn: Conn
    schema: str
    event_id: uuid.UUID
    deliveries: int

    async def publish(self, event: Event, *, subject: str | None = None) -> None:
        """Queue ``event`` in the outbox; it is published once this transaction commits."""
        await outbox.add_event(self.conn, self.schema, event, subject=subject)


Handler = Callable[[E, Tx], Awaitable[None]]


class DeadLetters:
    """Publishes a message that could not be processed to ``dlq.<subject>``, with why."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def send(self, msg: Msg, consumer: str, reason: str, deliveries: int) -> None:
        """Dead-letter ``msg`` (the payload byte for byte; the reason in headers).

        The DLQ message id is derived from the stream sequence, so re-sending after a
        crash between this publish and the original's termination stores it once.
        """
        seq = msg.metadata.sequence.stream if msg.reply else 0
        stream = msg.metadata.stream if msg.reply else ""
        headers = {
            DLQ_REASON: _one_line(reason)[:_MAX_REASON],
            DLQ_SUBJECT: msg.subject,
            DLQ_CONSUMER: consumer,
            DLQ_STREAM_SEQ: str(seq),
            DLQ_DELIVERIES: str(deliveries),
            outbox.MSG_ID_HEADER: f"dlq:{consumer}:{stream}:{seq}",
        }
        for key in ("traceparent", "tracestate"):
            if msg.headers and key in msg.headers:
                headers[key] = msg.headers[key]
        await self._js.publish(s.dlq_subject(msg.subject), msg.data, headers=headers)
        log.error(
            "dead-lettered %s (stream seq %s) for %s after %d deliveries: %s",
            msg.subject,
            seq,
            consumer,
            deliveries,
            reason,
        )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_validation_error(exc: ValidationError) -> str:
    """A short, actionable message for a payload that does not match its contract."""
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err["loc"]) or "<payload>"
        parts.append(f"{loc}: {err['msg']}")
    return f"malformed {exc.title}: " + "; ".join(parts)


class EventProcessor(Generic[E]):
    """Runs one handler under the kit's acknowledgement policy."""

    def __init__(
        self,
        *,
        event_type: type[E],
        handler: Handler[E],
        spec: ConsumerSpec,
        schema: str,
        pool: Callable[[], asyncpg.Pool],
        dead_letters: Callable[[], DeadLetters],
        heartbeat_seconds: float | None = None,
    ) -> None:
        self.event_type = event_type
        self.handler = handler
        self.spec = spec
        self.schema = schema
        self._pool = pool
        self._dead_letters = dead_letters
        self._heartbeat = heartbeat_seconds or max(spec.ack_wait / 3, 1.0)

    async def process(self, msg: Msg) -> str:
        """Handle one delivery; returns the outcome (for metrics and tests)."""
        started = time.perf_counter()
        consumer = self.spec.durable
        deliveries = msg.metadata.num_delivered if msg.reply else 1
        try:
            event = self.event_type.model_validate_json(msg.data)
        except ValidationError as exc:
            await self._dead_letter(msg, describe_validation_error(exc), deliveries)
            return self._done("malformed", started)
        except ValueError as exc:  # not JSON at all
            await self._dead_letter(msg, f"malformed payload: {exc}", deliveries)
            return self._done("malformed", started)

        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            outcome = await self._apply(event, msg, deliveries)
        except PermanentError as exc:
            await self._dead_letter(msg, f"{type(exc).__name__}: {exc}", deliveries)
            return self._done("dead_lettered", started)
        except asyncio.CancelledError:
            # Shutting down mid-handler: the transaction rolled back; let it be redelivered.
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Exception as exc:
            if deliveries >= self.spec.max_deliver:
                await self._dead_letter(
                    msg,
                    f"failed {deliveries} times, last error {type(exc).__name__}: {exc}",
                    deliveries,
                )
                return self._done("dead_lettered", started)
            delay = self.spec.delay_after(deliveries)
            log.warning(
                "%s: %s on %s (delivery %d), retrying in %.1fs",
                consumer,
                type(exc).__name__,
                msg.subject,
                deliveries,
                delay,
                exc_info=True,
            )
            await msg.nak(delay=delay)
            return self._done("retried", started)
        finally:
            keepalive.cancel()
        failpoints.hit("consumer.after_commit")
        await msg.ack()
        return self._done(outcome, started)

    async def _apply(self, event: E, msg: Msg, deliveries: int) -> str:
        async with self._pool().acquire() as conn, conn.transaction():
            if not await inbox.claim(
                conn, self.schema, self.spec.durable, event.event_id, msg.subject
            ):
                return "duplicate"
            await self.handler(
                event,
                Tx(conn=conn, schema=self.schema, event_id=event.event_id, deliveries=deliveries),
            )
        return "processed"

    async def _dead_letter(self, msg: Msg, reason: str, deliveries: int) -> None:
        await self._dead_letters().send(msg, self.spec.durable, reason, deliveries)
        await msg.term()

    async def _keep_alive(self, msg: Msg) -> None:
        """Tell the server a long handler is still working, so it is not redelivered."""
        while True:
            await asyncio.sleep(self._heartbeat)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    def _done(self, outcome: str, started: float) -> str:
        HANDLED.labels(self.spec.durable, outcome).inc()
        HANDLE_SECONDS.labels(self.spec.durable).observe(time.perf_counter() - started)
        return outcome
