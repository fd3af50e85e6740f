"""The dead-letter queue as a queue to act on: read it, replay from it (DESIGN §4a).

A dead letter (:class:`edgeloop.kit.consumer.DeadLetters`) is stored on
``dlq.<subject>`` — the subject as its stream stored it — with the payload byte for byte
and headers naming the reason, the consumer, the original's stream sequence and its
deliveries. Its id is its sequence in the DLQ stream.

A replay publishes the payload unchanged (it carries the event id, so the consumer's
inbox keeps the effect exactly-once) to the stored subject, which its stream accepts
as it is: a subject transform's source (TELEMETRY's ``device.telemetry.*.*``) does not
match the longer stored subject, so a partitioned message keeps its partition and goes
back to the same partition's durable. Its ``Nats-Msg-Id`` is ``replay:<dead letter id>``
— not the event id, whose original may still be inside the stream's duplicate window and
would swallow the replay — so a retried replay is stored once. A replayed dead letter
leaves the DLQ only once the consumer acknowledged the replay (its ack floor reached the
replay's stream sequence); if the consumer dead-lettered it again instead, the new dead
letter replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from edgeloop.contracts import subjects as s
from edgeloop.kit.consumer import (
    DLQ_CONSUMER,
    DLQ_DELIVERIES,
    DLQ_REASON,
    DLQ_STREAM_SEQ,
    DLQ_SUBJECT,
    DLQ_TRUNCATED,
)
from edgeloop.kit.outbox import MSG_ID_HEADER

REPLAY_OF = "Edgeloop-Dlq-Replay-Of"
"""Header of a replayed message: the id of the dead letter it came from."""
_KEPT_HEADERS = ("traceparent", "tracestate")
_FETCH = 256

# Outcomes of a replay, as recorded in the audit trail.
REPLAYING = "replaying"
ACKED = "acked"
"""The consumer acknowledged the replay: the dead letter is removed."""
DEAD_LETTERED_AGAIN = "dead_lettered_again"
"""The consumer dead-lettered the replay: the new dead letter replaces the old one."""
NOT_ACKED = "not_acked"
"""No acknowledgement within the timeout: the dead letter stays."""
FAILED = "failed"
"""Not replayed (its consumer is gone, the publish was refused): the dead letter stays."""
REMOVED = frozenset({ACKED, DEAD_LETTERED_AGAIN})


@dataclass(frozen=True)
class DeadLetter:
    """One message in the DLQ."""

    id: int
    """Its sequence in the DLQ stream."""
    subject: str
    """The original's subject, as its stream stored it."""
    consumer: str
    reason: str
    stream_seq: int
    """The original's sequence in its stream."""
    deliveries: int
    at: datetime
    """When it was dead-lettered."""
    payload: bytes
    headers: dict[str, str]
    truncated: int = 0
    """The original's size when the payload had to be cut to fit the DLQ (0: whole)."""

    @property
    def event(self) -> dict[str, Any]:
        """The payload as a JSON object ({} when it is not one: a malformed message)."""
        try:
            value = json.loads(self.payload)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def event_id(self) -> str | None:
        """The event id the payload carries, if any."""
        value = self.event.get("event_id")
        return str(value) if value is not None else None

    def summary(self) -> dict[str, Any]:
        """JSON-ready, without the payload."""
        return {
            "id": self.id,
            "subject": self.subject,
            "consumer": self.consumer,
            "reason": self.reason,
            "stream_seq": self.stream_seq,
            "deliveries": self.deliveries,
            "at": self.at.isoformat(),
            "event_id": self.event_id,
            "size": len(self.payload),
            "truncated": self.truncated or None,
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with headers and the payload (as JSON when it is JSON, else text)."""
        try:
            payload: Any = json.loads(self.payload)
        except ValueError:
            payload = self.payload.decode("utf-8", errors="replace")
        return {**self.summary(), "headers": self.headers, "payload": payload}


def _dead_letter(
    seq: int, dlq_subject: str, headers: dict[str, str] | None, data: bytes, at: datetime
) -> DeadLetter:
    h = dict(headers or {})
    prefix = f"{s.DLQ_PREFIX}."
    fallback = dlq_subject[len(prefix) :] if dlq_subject.startswith(prefix) else dlq_subject
    return DeadLetter(
        id=seq,
        subject=h.get(DLQ_SUBJECT) or fallback,
        consumer=h.get(DLQ_CONSUMER, ""),
        reason=h.get(DLQ_REASON, ""),
        stream_seq=int(h.get(DLQ_STREAM_SEQ) or 0),
        deliveries=int(h.get(DLQ_DELIVERIES) or 0),
        at=at.astimezone(UTC),
        payload=data,
        headers=h,
        truncated=int(h.get(DLQ_TRUNCATED) or 0),
    )


async def read(
    js: JetStreamContext,
    subject: str = ">",
    *,
    since: datetime | None = None,
    after: int = 0,
    limit: int | None = None,
) -> list[DeadLetter]:
    """Dead letters of ``subject`` (the original's; wildcards allowed), oldest first.

    ``since``: dead-lettered at or after; ``after``: only ids above it; ``limit``: the
    newest that many.
    """
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE, inactive_threshold=30.0, deliver_policy=DeliverPolicy.ALL
    )
    if after:
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, after + 1
    elif since is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = since.astimezone(UTC)
    sub = await js.pull_subscribe(s.dlq_subject(subject), stream=s.STREAM_DLQ, config=config)
    try:
        # what is stored now: dead letters arriving meanwhile are for the next look
        remaining = int((await sub.consumer_info()).num_pending or 0)
        out: deque[DeadLetter] = deque(maxlen=limit)
        while remaining > 0:
            msgs = await sub.fetch(min(remaining, _FETCH), timeout=5)
            remaining -= len(msgs)
            for m in msgs:
                meta = m.metadata
                out.append(
                    _dead_letter(meta.sequence.stream, m.subject, m.headers, m.data, meta.timestamp)
                )
        return list(out)
    finally:
        with contextlib.suppress(Exception):  # inactive_threshold removes it anyway
            await sub.unsubscribe()


class UnknownDeadLetter(LookupError):
    """No dead letter has that id (never, or it was replayed or dropped since)."""


async def get(js: JetStreamContext, dead_letter_id: int) -> DeadLetter:
    """The dead letter with this id.

    Raises:
        UnknownDeadLetter: there is none.
    """
    try:
        raw = await js.get_msg(s.STREAM_DLQ, dead_letter_id)
    except NotFoundError:
        raise UnknownDeadLetter(f"no dead letter #{dead_letter_id} in the DLQ") from None
    return _dead_letter(
        dead_letter_id,
        raw.subject or "",
        raw.headers,
        raw.data or b"",
        raw.time or datetime.now(UTC),
    )


@dataclass
class Replay:
    """One dead letter being replayed, and what became of it."""

    letter: DeadLetter
    outcome: str = REPLAYING
    detail: str = ""
    stream: str = ""
    seq: int = 0
    """The replay's sequence in its stream (0 until published)."""
    again: int | None = None
    """The id of the new dead letter, if the consumer dead-lettered the replay."""

    def record(self) -> dict[str, Any]:
        """What the audit record says about it."""
        event = self.letter.event
        return {
            "dlq_seq": self.letter.id,
            "subject": self.letter.subject,
            "consumer": self.letter.consumer,
            "event_id": self.letter.event_id,
            "model": event.get("model") if isinstance(event.get("model"), str) else None,
            "version": event.get("version") if isinstance(event.get("version"), str) else None,
            "outcome": self.outcome,
            "replay_seq": self.seq or None,
            "new_dlq_seq": self.again,
            "detail": self.detail or None,
        }


async def check_consumers(js: JetStreamContext, replays: Iterable[Replay]) -> None:
    """Mark ``failed`` every replay whose consumer does not exist (nobody would take it),
    and every one whose payload was cut to fit the DLQ (it is not the original event)."""
    known: dict[str, bool] = {}
    for r in replays:
        if r.letter.truncated:
            r.outcome = FAILED
            r.detail = (
                f"not replayed: its payload was cut from {r.letter.truncated} bytes to fit the "
                f"DLQ (the original is #{r.letter.stream_seq} of its stream); still in the DLQ"
            )
            continue
        name = r.letter.consumer
        if name not in known:
            known[name] = bool(name) and await _consumer_exists(js, r.letter.subject, name)
        if not known[name]:
            r.outcome = FAILED
            r.detail = (
                f"not replayed: its consumer {name or '(unnamed)'!r} does not exist on the "
                "stream; still in the DLQ"
            )


async def _consumer_exists(js: JetStreamContext, subject: str, consumer: str) -> bool:
    try:
        stream = await js.find_stream_name_by_subject(subject)
        await js.consumer_info(stream, consumer)
    except NotFoundError:
        return False
    return True


async def publish(js: JetStreamContext, replay: Replay) -> None:
    """Republish the dead letter's payload to its subject (see the module's docstring)."""
    letter = replay.letter
    headers = {k: v for k, v in letter.headers.items() if k in _KEPT_HEADERS}
    headers[MSG_ID_HEADER] = f"replay:{letter.id}"
    headers[REPLAY_OF] = str(letter.id)
    ack = await js.publish(letter.subject, letter.payload, headers=headers)
    replay.stream, replay.seq = ack.stream, ack.seq


async def settle(
    js: JetStreamContext,
    replays: list[Replay],
    *,
    timeout: float,  # noqa: ASYNC109 (a budget for many waits, not one call)
    poll: float = 0.2,
) -> None:
    """Wait until each published replay was acknowledged by its consumer (``acked``, or
    ``dead_lettered_again`` when the consumer dead-lettered it) or ``timeout`` passed
    (``not_acked``, with the consumer's ack floor)."""
    waiting = [r for r in replays if r.outcome == REPLAYING]
    dlq_last = (await js.stream_info(s.STREAM_DLQ)).state.last_seq
    deadline = time.monotonic() + timeout
    floors: dict[tuple[str, str], int] = {}
    while waiting:
        floors.clear()
        for r in waiting:
            key = (r.stream, r.letter.consumer)
            if key not in floors:
                info = await js.consumer_info(*key)
                floors[key] = info.ack_floor.stream_seq if info.ack_floor else 0
        done = [r for r in waiting if floors[(r.stream, r.letter.consumer)] >= r.seq]
        if done:
            await _dead_lettered_again(js, done, dlq_last)
        waiting = [r for r in waiting if r not in done]
        if not waiting:
            return
        if time.monotonic() >= deadline:
            for r in waiting:
                r.outcome = NOT_ACKED
                r.detail = (
                    f"not acked: {r.letter.consumer} has not acknowledged {r.stream} #{r.seq} "
                    f"within {timeout:g} s (its ack floor is "
                    f"#{floors[(r.stream, r.letter.consumer)]}); still in the DLQ"
                )
            return
        await asyncio.sleep(poll)


async def _dead_lettered_again(js: JetStreamContext, done: list[Replay], dlq_last: int) -> None:
    """Tell ``acked`` from ``dead_lettered_again``: the consumer terminates what it
    dead-letters, which moves its ack floor too, after storing the new dead letter."""
    for r in done:
        r.outcome = ACKED
        r.detail = f"acked by {r.letter.consumer} ({r.stream} #{r.seq}); removed from the DLQ"
        for new in await read(js, r.letter.subject, after=dlq_last):
            if new.consumer == r.letter.consumer and new.stream_seq == r.seq:
                r.outcome, r.again = DEAD_LETTERED_AGAIN, new.id
                r.detail = f"dead-lettered again as #{new.id}, which replaces it: {new.reason}"


async def remove(js: JetStreamContext, replay: Replay) -> None:
    """Delete a dead letter whose replay was acknowledged (one gone already is fine)."""
    with contextlib.suppress(NotFoundError):
        await js.delete_msg(s.STREAM_DLQ, replay.letter.id)
