"""The kit's acknowledgement policy: exactly-once effect on at-least-once delivery.

For every delivered message:
1. parse it into its contract model; malformed → dead-lettered at once with the error;
2. in one PostgreSQL transaction: claim the event id in the inbox (a redelivery finds it
   claimed and does nothing), run the handler (its state changes and the events it
   queues in the outbox), commit;
3. ack only after the commit;
4. on an error: ``PermanentError`` → dead-letter now. An error that looks like an outage
   (see :mod:`edgeloop.kit.faults`) makes the consumer look at PostgreSQL and NATS: if one
   does not answer, it holds the messages in hand (telling the server they are in
   progress, fetching nothing more) until both answer, then tries again, and the
   message's delivery budget is untouched. Serialization failures and deadlocks are
   retried at once. Anything else — the message failing while its dependencies answer —
   is nak'ed with the consumer's back-off and dead-lettered after ``max_deliver``
   attempts. Nothing is ever dropped silently (FastStream's default would ack a message
   whose handler raised), and a DLQ that cannot be reached holds the message too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import Event
from edgeloop.kit import failpoints, inbox, outbox
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.db import Conn
from edgeloop.kit.faults import certainly_outage, is_conflict, looks_like_outage, refused_value
from edgeloop.kit.tracing import extract_context

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
DLQ_TRUNCATED = "Edgeloop-Dlq-Truncated"
"""Set when the payload was cut to fit the DLQ: the original's size in bytes."""
_MAX_REASON = 4000
#: what is left of a reason before a payload is cut to fit the DLQ
_MIN_REASON = 1000
_MAX_TRACE_HEADER = 512
#: nats-py's assumption until the server says (its INFO's max_payload)
DEFAULT_MAX_PAYLOAD = 1 << 20
#: serialization failures / deadlocks retried at once before they count
MAX_CONFLICT_RETRIES = 10
#: lost connections retried at once (the dependency answers again) before they count
MAX_FREE_RECONNECTS = 3
#: the longest pause between two looks at a dependency that is down
MAX_OUTAGE_POLL = 2.0

WAITING = Gauge(
    "edgeloop_consumer_waiting", "1 while a consumer holds messages during an outage", ["consumer"]
)
OUTAGE_SECONDS = Counter(
    "edgeloop_consumer_outage_seconds_total", "Time consumers held messages", ["consumer"]
)
ACK_FAILURES = Counter("edgeloop_consumer_ack_failures_total", "Acks that failed", ["consumer"])


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
    subject: str = ""
    """The subject the event arrived on (a consumer of several subjects tells them apart
    by it)."""
    committed: list[Callable[[], None]] = field(default_factory=list)
    """Callbacks run once the transaction committed (e.g. wake a local worker)."""
    shared: dict[str, Any] = field(default_factory=dict)
    """State shared by the handlers of one transaction (a fetched batch is applied in
    one): accumulate there, write once in a :meth:`before_commit` callback."""
    flushes: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    def before_commit(self, key: str, flush: Callable[[], Awaitable[None]]) -> None:
        """Run ``flush`` once, in this transaction, after every handler of the batch ran
        (registered again under the same ``key``: still once)."""
        self.flushes.setdefault(key, flush)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once this transaction has committed (never if it rolls back)."""
        self.committed.append(callback)

    async def publish(self, event: Event, *, subject: str | None = None) -> None:
        """Queue ``event`` in the outbox; it is published once this transaction commits."""
        await outbox.add_event(self.conn, self.schema, event, subject=subject)


Handler = Callable[[E, Tx], Awaitable[None]]


@dataclass
class _Tries:
    """Free retries spent on one application (they do not count as deliveries)."""

    conflicts: int = 0
    lost: int = 0


class DeadLetters:
    """Publishes a message that could not be processed to ``dlq.<subject>``, with why.

    ``max_payload``: the most the server takes in one message, headers included (the
    connection's, from the server's INFO; default: what nats-py assumes).
    """

    def __init__(self, js: JetStreamContext, max_payload: Callable[[], int] | None = None) -> None:
        self._js = js
        self._max_payload = max_payload or (lambda: DEFAULT_MAX_PAYLOAD)

    async def send(self, msg: Msg, consumer: str, reason: str, deliveries: int) -> None:
        """Dead-letter ``msg`` (the payload byte for byte; the reason in headers).

        The DLQ message id is derived from the stream sequence, so re-sending after a
        crash between this publish and the original's termination stores it once.

        A dead letter larger than the server takes (an original near ``max_payload``,
        plus the reason) would never be stored: the server drops the connection of
        whoever sends it. So the copied trace headers and then the reason (down to
        ``_MIN_REASON`` characters) give way first, then the payload's tail: the dead
        letter keeps the head, and ``Edgeloop-Dlq-Truncated`` and the reason say so.
        """
        seq = msg.metadata.sequence.stream if msg.reply else 0
        stream = msg.metadata.stream if msg.reply else ""
        headers = {
            DLQ_REASON: _header_text(reason)[:_MAX_REASON],
            DLQ_SUBJECT: msg.subject,
            DLQ_CONSUMER: consumer,
            DLQ_STREAM_SEQ: str(seq),
            DLQ_DELIVERIES: str(deliveries),
            outbox.MSG_ID_HEADER: f"dlq:{consumer}:{stream}:{seq}",
        }
        for key in ("traceparent", "tracestate"):
            if msg.headers and key in msg.headers and len(msg.headers[key]) <= _MAX_TRACE_HEADER:
                headers[key] = msg.headers[key]
        payload = self._fit(headers, msg.data, f"{stream} #{seq}")
        await self._js.publish(s.dlq_subject(msg.subject), payload, headers=headers)
        log.error(
            "dead-lettered %s (stream seq %s) for %s after %d deliveries: %s",
            msg.subject,
            seq,
            consumer,
            deliveries,
            reason,
        )

    def _fit(self, headers: dict[str, str], payload: bytes, original: str) -> bytes:
        """``payload``, cut if the dead letter would be larger than the server takes
        (``headers`` changed to match)."""
        limit = self._max_payload()
        if len(payload) + headers_size(headers) <= limit:
            return payload
        for key in ("traceparent", "tracestate"):
            headers.pop(key, None)
        over = len(payload) + headers_size(headers) - limit
        reason = headers[DLQ_REASON]
        if over > 0 and len(reason) > _MIN_REASON:
            headers[DLQ_REASON] = reason[: max(_MIN_REASON, len(reason) - over)]
        if len(payload) + headers_size(headers) <= limit:
            return payload
        headers[DLQ_TRUNCATED] = str(len(payload))
        note = f" (payload cut from {len(payload)} bytes to fit the DLQ; the original: {original})"
        headers[DLQ_REASON] = headers[DLQ_REASON][: _MIN_REASON - len(note)] + note
        return payload[: max(0, limit - headers_size(headers))]


def headers_size(headers: dict[str, str]) -> int:
    """Bytes ``headers`` take in a NATS message (``NATS/1.0``, ``Key: Value`` lines)."""
    lines = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    return len(b"NATS/1.0\r\n") + lines + 2


def _header_text(text: str) -> str:
    """``text`` on one line, with no control characters (a header value)."""
    return printable(_one_line(text))


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\x00``): what a device or a
    payload put in a name can go into a header, a log line or a table."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_validation_error(exc: ValidationError) -> str:
    """A short, actionable message for a payload that does not match its contract."""
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err["loc"]) or "<payload>"
        parts.append(f"{loc}: {err['msg']}")
    return f"malformed {exc.title}: " + "; ".join(parts)


class MalformedEvent(ValueError):
    """A payload that is not an event of the expected type; the message says why."""


def parse_event(event_type: type[E], data: bytes) -> E:
    """``data`` as an ``event_type``, or :class:`MalformedEvent` saying what is wrong.

    Beyond the contract: the event id must be on the wire (a default one would make
    every redelivery a new event, which no inbox can de-duplicate), and nothing in it
    may be what PostgreSQL cannot store (a NUL character; NaN or Infinity, which are not
    JSON either), whether or not this consumer's handler stores that field: the same
    event must be malformed for every consumer, and a replay must not succeed by chance.

    The message is one line without control characters (it names fields of the payload,
    which may be anything): it goes to a header, the log and a service's own table.
    """
    try:
        return _parse(event_type, data)
    except MalformedEvent as exc:
        raise MalformedEvent(_header_text(str(exc))) from None


def _parse(event_type: type[E], data: bytes) -> E:
    name = event_type.__name__
    try:
        event = event_type.model_validate_json(data)
    except ValidationError as exc:
        raise MalformedEvent(describe_validation_error(exc)) from None
    except ValueError as exc:  # not JSON at all
        raise MalformedEvent(f"malformed payload: {exc}") from None
    if "event_id" not in event.model_fields_set:
        raise MalformedEvent(
            f"malformed {name}: event_id: Field required (an event without its id cannot "
            "be de-duplicated)"
        )
    if (where := unstorable(data)) is not None:
        raise MalformedEvent(f"malformed {name}: {where}")
    return event


_SUSPECT = (b"\\u0000", b"NaN", b"Infinity")
#: A number of 19 digits or more (beyond int64 from 9,223,372,036,854,775,808 up), or with
#: an exponent of 3 digits or more (beyond a double from 1e309 up, which parses as inf).
_SUSPECT_NUMBER = re.compile(rb"\d{19}|[eE][+-]?\d{3}")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def unstorable(data: bytes) -> str | None:
    """Where JSON ``data`` holds what PostgreSQL cannot store (a NUL character, in a
    string or a key; a NaN or an Infinity, or a number too large for a double; an integer
    beyond 64 bits, which no integer column takes), and what; None when nothing."""
    # the common case: one scan per pattern
    if not any(s in data for s in _SUSPECT) and _SUSPECT_NUMBER.search(data) is None:
        return None
    return _unstorable(json.loads(data), "")


def _unstorable(value: object, path: str) -> str | None:
    where = path or "<payload>"
    if isinstance(value, str):
        if "\x00" in value:
            return f"{where}: a NUL character (U+0000), which PostgreSQL cannot store"
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            return f"{where}: {value} does not fit in 64 bits (no integer column takes it)"
    elif isinstance(value, float):
        if not math.isfinite(value):
            return f"{where}: {value} is not a finite number (NaN and Infinity are not JSON)"
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if "\x00" in key:
                return f"{inner!r}: a NUL character (U+0000) in a key (PostgreSQL cannot store it)"
            if (found := _unstorable(item, inner)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _unstorable(item, f"{path}.{i}" if path else str(i))) is not None:
                return found
    return None


Malformed = Callable[[Conn, Msg, str], Awaitable[None]]
"""Called (in its own transaction) for a message that does not parse, before it is
dead-lettered: a service that accounts for bad input by sender records it here."""


class EventProcessor(Generic[E]):
    """Runs one handler under the kit's acknowledgement policy.

    Messages arrive in fetched batches. A batch is applied in one transaction (every
    inbox claim and every effect), which amortises the commit; if any handler in it
    raises, that transaction is rolled back and the batch is applied again one event per
    transaction, so only the failing event is retried or dead-lettered.
    """

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
        tracer_provider: TracerProvider | None = None,
        on_malformed: Malformed | None = None,
        nats_connected: Callable[[], bool] | None = None,
    ) -> None:
        self.event_type = event_type
        self._nats_connected = nats_connected
        self._on_malformed = on_malformed
        self.handler = handler
        self.spec = spec
        self.schema = schema
        self._pool = pool
        self._dead_letters = dead_letters
        self._heartbeat = heartbeat_seconds or max(spec.ack_wait / 3, 1.0)
        # Each event's handler runs in a span that continues the event's own trace (its
        # ``traceparent`` header): in batch mode FastStream can only link a batch's
        # contexts, so the kit makes each event's current itself. Without an exporter the
        # no-op tracer still carries the parent's ids, so outbox rows continue the trace.
        self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(
            "edgeloop.kit.consumer"
        )
        self._recording = tracer_provider is not None

    async def process(self, msg: Msg) -> str:
        """Handle one delivery; returns its outcome (for metrics and tests)."""
        return (await self.process_batch([msg]))[0]

    async def process_batch(self, msgs: Sequence[Msg]) -> list[str]:
        """Handle a fetched batch; returns each message's outcome, in order.

        Never raises but ``CancelledError``: an outage of PostgreSQL or NATS holds the
        batch (the server is told it is in progress) until they answer again.
        """
        started = time.perf_counter()
        outcomes: list[str] = [""] * len(msgs)
        parsed: list[tuple[int, Msg, E]] = []
        malformed: list[tuple[int, Msg, str]] = []
        for i, msg in enumerate(msgs):
            try:
                parsed.append((i, msg, parse_event(self.event_type, msg.data)))
            except MalformedEvent as exc:
                malformed.append((i, msg, str(exc)))
        keepalive = asyncio.create_task(self._keep_alive(msgs))
        try:
            for i, msg, reason in malformed:
                await self._malformed(msg, reason)
                outcomes[i] = "malformed"
            if parsed:
                await self._apply_all(parsed, outcomes)
        finally:
            keepalive.cancel()
        elapsed = time.perf_counter() - started
        for outcome in outcomes:
            HANDLED.labels(self.spec.durable, outcome).inc()
            HANDLE_SECONDS.labels(self.spec.durable).observe(elapsed)
        return outcomes

    async def _apply_all(self, parsed: list[tuple[int, Msg, E]], outcomes: list[str]) -> None:
        tries = _Tries()
        while len(parsed) > 1:
            try:
                results = await self._transaction(parsed)
            except asyncio.CancelledError:
                await self._nak_all([m for _, m, _ in parsed])
                raise
            except Exception as exc:
                if await self._worth_retrying(exc, tries):
                    continue
                log.info(
                    "%s: batch of %d failed (%s: %s); applying one by one",
                    self.spec.durable,
                    len(parsed),
                    type(exc).__name__,
                    exc,
                )
                break
            failpoints.hit("consumer.after_commit")
            for (i, msg, _), result in zip(parsed, results, strict=True):
                await self._ack(msg)
                outcomes[i] = result
            return
        for i, msg, event in parsed:
            outcomes[i] = await self._apply_one(msg, event)

    async def _apply_one(self, msg: Msg, event: E) -> str:
        tries = _Tries()
        while True:
            try:
                (result,) = await self._transaction([(0, msg, event)])
            except PermanentError as exc:
                await self._dead_letter(msg, f"{type(exc).__name__}: {exc}")
                return "dead_lettered"
            except asyncio.CancelledError:
                # Shutting down mid-handler: the transaction rolled back; redeliver it.
                await self._nak_all([msg])
                raise
            except Exception as exc:
                if await self._worth_retrying(exc, tries):
                    continue
                if (why := refused_value(exc)) is not None:
                    await self._dead_letter(msg, f"the event holds {why}")
                    return "dead_lettered"
                return await self._failed(msg, exc)
            failpoints.hit("consumer.after_commit")
            await self._ack(msg)
            return result

    async def _worth_retrying(self, exc: Exception, tries: _Tries) -> bool:
        """Whether to apply again without charging the message: a serialization failure
        or a deadlock (a few times, after a short random pause); an outage the
        dependencies confirm (once it is over); a connection lost under us, which is not
        the message's fault even if the dependency answers again at once (a few times)."""
        if is_conflict(exc) and tries.conflicts < MAX_CONFLICT_RETRIES:
            tries.conflicts += 1
            await asyncio.sleep(random.uniform(0, 0.02 * tries.conflicts))
            return True
        if not looks_like_outage(exc):
            return False
        if await self._outage(exc):
            return True
        if certainly_outage(exc) and tries.lost < MAX_FREE_RECONNECTS:
            tries.lost += 1
            return True
        return False

    async def _failed(self, msg: Msg, exc: Exception) -> str:
        """The message failed while PostgreSQL and NATS answered: spend one delivery."""
        deliveries = _deliveries(msg)
        if deliveries >= self.spec.max_deliver:
            await self._dead_letter(
                msg,
                f"failed {deliveries} times while PostgreSQL and NATS answered, "
                f"last error {type(exc).__name__}: {exc}",
            )
            return "dead_lettered"
        delay = self.spec.delay_after(deliveries)
        log.warning(
            "%s: %s on %s (delivery %d), retrying in %.1fs",
            self.spec.durable,
            type(exc).__name__,
            msg.subject,
            deliveries,
            delay,
            exc_info=exc,
        )
        await self._nak(msg, delay)
        return "retried"

    async def _outage(self, exc: BaseException) -> bool:
        """``exc`` looks like a dependency is down: if one does not answer, hold on until
        every one does and return True (retry, nothing charged); False when all answer."""
        if await self._dependencies_answer():
            return False
        WAITING.labels(self.spec.durable).set(1)
        t0 = time.monotonic()
        log.warning(
            "%s: %s: %s; holding the messages in hand until PostgreSQL and NATS answer",
            self.spec.durable,
            type(exc).__name__,
            exc,
        )
        delay = 0.25
        try:
            while True:
                await asyncio.sleep(delay)
                if await self._dependencies_answer():
                    break
                delay = min(delay * 2, MAX_OUTAGE_POLL)
        finally:
            WAITING.labels(self.spec.durable).set(0)
            OUTAGE_SECONDS.labels(self.spec.durable).inc(time.monotonic() - t0)
        log.warning(
            "%s: dependencies answer again after %.1f s; resuming",
            self.spec.durable,
            time.monotonic() - t0,
        )
        return True

    async def _dependencies_answer(self) -> bool:
        if self._nats_connected is not None and not self._nats_connected():
            return False
        try:
            async with self._pool().acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1", timeout=2)
        except asyncio.CancelledError:
            raise
        except Exception:
            return False
        return True

    async def _transaction(self, items: list[tuple[int, Msg, E]]) -> list[str]:
        """Claim every event in the inbox and apply the new ones, in one transaction."""
        done: list[Callable[[], None]] = []
        shared: dict[str, Any] = {}
        flushes: dict[str, Callable[[], Awaitable[None]]] = {}
        async with self._pool().acquire() as conn, conn.transaction():
            fresh = await inbox.claim_many(
                conn,
                self.schema,
                self.spec.durable,
                [(event.event_id, msg.subject) for _, msg, event in items],
            )
            results = []
            for _, msg, event in items:
                if event.event_id not in fresh:
                    results.append("duplicate")
                    continue
                fresh.discard(event.event_id)  # the same event twice in one batch
                tx = Tx(
                    conn=conn,
                    schema=self.schema,
                    event_id=event.event_id,
                    deliveries=_deliveries(msg),
                    subject=msg.subject,
                    shared=shared,
                    flushes=flushes,
                )
                if self._recording or (msg.headers and "traceparent" in msg.headers):
                    with self._tracer.start_as_current_span(
                        f"{self.spec.durable} process",
                        context=extract_context(msg.headers),
                        kind=SpanKind.CONSUMER,
                        attributes={
                            "messaging.system": "nats",
                            "messaging.destination.name": msg.subject,
                            "messaging.message.id": str(event.event_id),
                        },
                    ):
                        await self.handler(event, tx)
                else:  # nothing to record and no trace to continue: skip the span's cost
                    await self.handler(event, tx)
                results.append("processed")
                done.extend(tx.committed)
            for flush in flushes.values():
                await flush()
        for callback in done:
            try:
                callback()
            except Exception:
                log.exception("%s: an after-commit callback failed", self.spec.durable)
        return results

    async def _malformed(self, msg: Msg, reason: str) -> None:
        if self._on_malformed is not None:
            hook = self._on_malformed
            while True:
                try:
                    async with self._pool().acquire() as conn, conn.transaction():
                        await hook(conn, msg, reason)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if looks_like_outage(exc) and await self._outage(exc):
                        continue
                    log.exception("%s: the malformed-message hook failed", self.spec.durable)
                    break
        await self._dead_letter(msg, reason)

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        """Publish to the DLQ until it is stored (a message is never dropped because the
        DLQ could not be reached), then terminate the original."""
        delay = 0.5
        while True:
            try:
                failpoints.hit("consumer.dead_letter")
                await self._dead_letters().send(msg, self.spec.durable, reason, _deliveries(msg))
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "%s: could not dead-letter %s (%s: %s); trying again",
                    self.spec.durable,
                    msg.subject,
                    type(exc).__name__,
                    exc,
                )
                if not await self._outage(exc):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_OUTAGE_POLL)
        try:
            failpoints.hit("consumer.term")
            await msg.term()
        except Exception as exc:  # it comes back and is dead-lettered again (same DLQ id)
            log.warning("%s: term after dead-lettering failed: %s", self.spec.durable, exc)

    async def _ack(self, msg: Msg) -> None:
        """Ack after the commit. If the ack is lost the message comes back and the inbox
        finds it processed: nothing to retry here."""
        try:
            failpoints.hit("consumer.ack")
            await msg.ack()
        except Exception as exc:
            ACK_FAILURES.labels(self.spec.durable).inc()
            log.warning(
                "%s: ack of %s failed (%s: %s); its redelivery will find it processed",
                self.spec.durable,
                msg.subject,
                type(exc).__name__,
                exc,
            )

    async def _nak(self, msg: Msg, delay: float) -> None:
        try:
            failpoints.hit("consumer.nak")
            await msg.nak(delay=delay)
        except Exception as exc:  # redelivered after ack_wait instead of after the delay
            log.warning("%s: nak failed (%s); redelivery after ack_wait", self.spec.durable, exc)

    @staticmethod
    async def _nak_all(msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.nak()

    async def _keep_alive(self, msgs: Sequence[Msg]) -> None:
        """Tell the server long handlers are still working, so they are not redelivered."""
        while True:
            await asyncio.sleep(self._heartbeat)
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.in_progress()


def _deliveries(msg: Msg) -> int:
    return msg.metadata.num_delivered if msg.reply else 1
