"""Every lifecycle event → a pending delivery per subscription that asked for it, in
the transaction that records the event as processed (so a redelivered event, or a
restart, neither loses nor doubles one)."""

from __future__ import annotations

import uuid

from pydantic import ConfigDict, ValidationError

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import EVENTS_BY_SUBJECT, Event
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.consumer import PermanentError, Tx, describe_validation_error
from edgeloop.kit.service import Service
from edgeloop.notifier import store
from edgeloop.notifier.service import Deliverer, render


class AnyLifecycleEvent(Event):
    """Any lifecycle event, its fields kept as they came: what the consumer parses
    first, before it validates the event as the class of the subject it arrived on
    (``EVENTS_BY_SUBJECT``; not a wire message of its own)."""

    model_config = ConfigDict(frozen=True, extra="allow")


SPEC = ConsumerSpec(
    stream=s.STREAM_LIFECYCLE,
    durable=s.CONSUMER_NOTIFIER,
    filter_subjects=s.LIFECYCLE_SUBJECTS,
    # a first start notifies from now on, not the stream's year of history
    deliver_new_only=True,
)


def register_handlers(svc: Service, deliverer: Deliverer) -> None:
    """Subscribe the notifier's consumer."""

    @svc.consume(AnyLifecycleEvent, SPEC)
    async def on_lifecycle_event(event: AnyLifecycleEvent, tx: Tx) -> None:
        event_type = EVENTS_BY_SUBJECT.get(tx.subject)
        if event_type is None:
            return  # a subject no subscription can name (a newer producer's)
        try:
            typed = event_type.model_validate(event.model_dump())
        except ValidationError as exc:
            raise PermanentError(describe_validation_error(exc)) from None
        targets = await store.targets(tx.conn, tx.subject, typed.occurred_at)
        for target in targets:
            delivery_id = uuid.uuid4()
            await store.add_delivery(
                tx.conn,
                delivery_id=delivery_id,
                subscription_id=target.subscription_id,
                event_id=typed.event_id,
                event=tx.subject,
                body=render(
                    target.format,
                    tx.subject,
                    typed,
                    delivery_id=delivery_id,
                    subscription_id=target.subscription_id,
                ),
            )
        if targets:
            tx.after_commit(deliverer.wake)
