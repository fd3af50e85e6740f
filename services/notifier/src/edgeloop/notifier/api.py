"""The notifier's HTTP API: webhook subscriptions (add, list, remove, test) and the
delivery log. Every change is audited in its transaction; no answer carries a secret."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Literal

import asyncpg
from fastapi import FastAPI, HTTPException, Query

from edgeloop.contracts.webhooks import TEST_EVENT, SubscriptionIn
from edgeloop.kit import audit
from edgeloop.kit.api import Actor, NotifyWriter, new_api
from edgeloop.kit.db import Conn
from edgeloop.notifier import store
from edgeloop.notifier.service import TestEvent, render

Status = Literal["pending", "delivered", "dead", "cancelled"]


async def _audit(conn: Conn, who: str, action: str, sub: dict[str, Any], **change: Any) -> None:
    await audit.record(
        conn,
        service="notifier",
        actor=who,
        action=action,
        subject=f"subscription {sub['subscription_id']}",
        **change,
    )


def _shown(sub: dict[str, Any]) -> dict[str, Any]:
    """What an audit record keeps of a subscription (never its secret)."""
    return {k: sub[k] for k in ("url", "events", "format", "description")}


def create_api(
    pool: Callable[[], asyncpg.Pool], tokens: frozenset[str], wake: Callable[[], None]
) -> FastAPI:
    """The FastAPI app (OpenAPI at ``/docs``); ``wake`` tells the delivery worker a
    delivery was added."""
    api = new_api(
        title="edgeloop notifier",
        version="1",
        description="Signed webhooks for lifecycle events: subscriptions and their deliveries.",
    )
    api.state.tokens = tokens
    api.state.pool = pool

    async def active(conn: Conn, subscription_id: uuid.UUID) -> dict[str, Any]:
        sub = await store.get_subscription(conn, subscription_id)
        if sub is None or sub["removed_at"] is not None:
            raise HTTPException(404, f"no active subscription {subscription_id}")
        return sub

    @api.post("/v1/subscriptions", status_code=201)
    async def add(body: SubscriptionIn, who: NotifyWriter) -> dict[str, Any]:
        """Subscribe a URL to events; the secret signs every delivery and is never shown."""
        async with pool().acquire() as conn, conn.transaction():
            sub = await store.add_subscription(
                conn,
                url=body.url,
                events=body.events,
                secret=body.secret,
                format=body.format,
                description=body.description,
                actor=who,
            )
            await _audit(conn, who, "notify.subscribe", sub, after=_shown(sub))
        return sub

    @api.get("/v1/subscriptions")
    async def subscriptions(_: Actor, removed: bool = False) -> dict[str, Any]:
        """Subscriptions (``removed=true``: the removed ones too), with their pending and
        dead deliveries."""
        async with pool().acquire() as conn:
            return {"subscriptions": await store.list_subscriptions(conn, removed=removed)}

    @api.get("/v1/subscriptions/{subscription_id}")
    async def subscription(subscription_id: uuid.UUID, _: Actor) -> dict[str, Any]:
        """One subscription (removed or not)."""
        async with pool().acquire() as conn:
            sub = await store.get_subscription(conn, subscription_id)
        if sub is None:
            raise HTTPException(404, f"no subscription {subscription_id}")
        return sub

    @api.delete("/v1/subscriptions/{subscription_id}")
    async def remove(subscription_id: uuid.UUID, who: NotifyWriter) -> dict[str, Any]:
        """Remove a subscription: its pending deliveries are cancelled, its log stays."""
        async with pool().acquire() as conn, conn.transaction():
            sub = await store.remove_subscription(conn, subscription_id, who)
            if sub is None:
                raise HTTPException(404, f"no active subscription {subscription_id}")
            await _audit(conn, who, "notify.unsubscribe", sub, before=_shown(sub))
        return sub

    @api.post("/v1/subscriptions/{subscription_id}/test", status_code=202)
    async def test(subscription_id: uuid.UUID, who: NotifyWriter) -> dict[str, Any]:
        """Send a test delivery (event ``notify.test``) the way any other is sent; its
        outcome is in ``GET /v1/deliveries/{delivery_id}``."""
        event = TestEvent()
        delivery_id = uuid.uuid4()
        async with pool().acquire() as conn, conn.transaction():
            sub = await active(conn, subscription_id)
            body = render(
                sub["format"],
                TEST_EVENT,
                event,
                delivery_id=delivery_id,
                subscription_id=subscription_id,
            )
            await store.add_delivery(
                conn,
                delivery_id=delivery_id,
                subscription_id=subscription_id,
                event_id=event.event_id,
                event=TEST_EVENT,
                body=body,
            )
            await _audit(conn, who, "notify.test", sub, after={"delivery_id": str(delivery_id)})
        wake()
        return {"delivery_id": delivery_id, "subscription_id": subscription_id}

    @api.get("/v1/deliveries")
    async def deliveries(
        _: Actor,
        subscription: uuid.UUID | None = None,
        status: Status | None = None,
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict[str, Any]:
        """The delivery log, newest first (``status=dead``: the dead-lettered ones)."""
        async with pool().acquire() as conn:
            rows = await store.list_deliveries(
                conn, subscription_id=subscription, status=status, limit=limit
            )
        return {"deliveries": rows}

    @api.post("/v1/deliveries/{delivery_id}/retry")
    async def retry(delivery_id: uuid.UUID, who: NotifyWriter) -> dict[str, Any]:
        """Send a dead delivery again (the same body and delivery id), with another
        round of attempts; after fixing the receiver."""
        async with pool().acquire() as conn, conn.transaction():
            row = await store.retry_delivery(conn, delivery_id)
            if row is None:
                raise HTTPException(
                    409 if await store.get_delivery(conn, delivery_id) else 404,
                    f"no dead delivery {delivery_id} of an active subscription to retry",
                )
            sub = {"subscription_id": row["subscription_id"]}
            await _audit(
                conn,
                who,
                "notify.retry",
                sub,
                before={"delivery_id": str(delivery_id), "attempts": row["attempts"]},
                reason=row["last_error"],
            )
        wake()
        return row

    @api.get("/v1/deliveries/{delivery_id}")
    async def delivery(delivery_id: uuid.UUID, _: Actor) -> dict[str, Any]:
        """One delivery: its body as sent and every attempt (status code or error)."""
        async with pool().acquire() as conn:
            row = await store.get_delivery(conn, delivery_id)
        if row is None:
            raise HTTPException(404, f"no delivery {delivery_id}")
        return row

    return api
