"""Webhook notifications (issue 20 item 3): the notifier service on real NATS and
PostgreSQL, POSTing to a real HTTP receiver served by uvicorn in the test."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from nats.js import JetStreamContext
from typer.testing import CliRunner

from edgeloop.cli.main import app as cli
from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import AlarmResolved, RolloutRolledBack
from edgeloop.contracts.webhooks import DELIVERY_HEADER, EVENT_HEADER, verify
from edgeloop.devstack.servers import Postgres, free_port
from edgeloop.devstack.testing import api_up, eventually, publish_event, stream_messages
from edgeloop.devstack.up import ServiceProcess
from edgeloop.kit.consumer import DLQ_CONSUMER, DLQ_REASON
from edgeloop.kit.service import Service
from edgeloop.kit.tokens import issue_token
from edgeloop.notifier.app import build
from edgeloop.notifier.config import NotifierSettings
from edgeloop.notifier.store import PgDeliveries
from tests.notify_harness import TOKEN, Receiver, notifier_settings, receiving
from tests.notify_harness import alarm as new_alarm

SECRET = "receiver-shared-secret-0123456789"


@dataclass
class NotifierApi:
    """The notifier's API, as the operator's admin token."""

    api: httpx.AsyncClient

    async def subscribe(self, url: str, events: list[str], **extra: Any) -> str:
        body = {"url": url, "events": events, "secret": SECRET, **extra}
        resp = await self.api.post("/v1/subscriptions", json=body)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["subscription_id"])

    async def deliveries(self, **params: Any) -> list[dict[str, Any]]:
        resp = await self.api.get("/v1/deliveries", params=params)
        assert resp.status_code == 200, resp.text
        rows: list[dict[str, Any]] = resp.json()["deliveries"]
        return rows

    async def settled(self, subscription: str, count: int = 1) -> list[dict[str, Any]]:
        """The subscription's deliveries once ``count`` of them are done (not pending)."""

        async def done() -> list[dict[str, Any]] | None:
            rows = await self.deliveries(subscription=subscription)
            finished = [r for r in rows if r["status"] != "pending"]
            return rows if len(finished) >= count else None

        result: list[dict[str, Any]] = await eventually(done, what=f"{count} settled deliveries")
        return result


@dataclass
class Notifier(NotifierApi):
    """The notifier in this process and its API."""

    settings: NotifierSettings
    svc: Service
    dsn: str


@contextlib.asynccontextmanager
async def running_notifier(nats_url: str, dsn: str) -> AsyncIterator[Notifier]:
    """The notifier on ``nats_url`` and database ``dsn``; retries short (3 attempts,
    50 ms doubling)."""
    settings = notifier_settings(
        nats_url,
        dsn,
        max_attempts=3,
        retry_base_seconds=0.05,
        retry_max_seconds=0.2,
        poll_seconds=0.05,
        request_timeout_seconds=5,
    )
    svc = build(settings)
    await svc.start()
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{settings.api_port}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as api:
        n = Notifier(api=api, settings=settings, svc=svc, dsn=dsn)
        try:
            await eventually(lambda: api_up(api), what="the notifier API")
            yield n
        finally:
            await n.svc.stop()


@pytest.fixture
async def notifier(nats_url: str, private_dsn: str) -> AsyncIterator[Notifier]:
    """The notifier on the session's NATS and a database of the test's own."""
    async with running_notifier(nats_url, private_dsn) as n:
        yield n


async def test_receiver_gets_alarm_raised_signed(
    notifier: Notifier, admin_js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver()
    port = free_port()
    async with receiving(receiver, port=port):
        sub = await notifier.subscribe(receiver.url, ["alarm.raised"])
        alarm = new_alarm()
        # not asked for: no delivery
        await publish_event(
            admin_js,
            AlarmResolved(model="iris", version="1.0.0", alarm_id=alarm.alarm_id, rule="psi"),
        )
        await publish_event(admin_js, alarm)
        (delivery,) = await notifier.settled(sub)

    assert delivery["status"] == "delivered", delivery
    assert delivery["event"] == "alarm.raised"
    ((headers, body),) = receiver.got
    # sha256=HMAC(secret, "<timestamp>.<body>"), as a receiver computes it
    signed = headers["x-edgeloop-timestamp"].encode() + b"." + body
    expected = hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert headers["x-edgeloop-signature"] == f"sha256={expected}"
    verify(SECRET, headers, body)  # the contracts' check agrees
    with pytest.raises(ValueError, match="signature"):
        verify(SECRET, headers, body.replace(b"psi 0.4", b"psi 0.1"))
    assert headers[EVENT_HEADER.lower()] == "alarm.raised"
    assert headers[DELIVERY_HEADER.lower()] == delivery["delivery_id"]
    doc = json.loads(body)
    assert doc["event"] == "alarm.raised"
    assert doc["data"]["alarm_id"] == str(alarm.alarm_id)
    assert doc["event_id"] == str(alarm.event_id)
    # the secret never comes back from the API
    listed = await notifier.api.get("/v1/subscriptions")
    shown = await notifier.api.get(f"/v1/deliveries/{delivery['delivery_id']}")
    for resp in (listed, shown):
        assert resp.status_code == 200
        assert SECRET not in resp.text
        assert "secret" not in resp.text
    # `notify test` sends a notify.test delivery the same way, and says how it went
    monkeypatch.setenv("EDGELOOP_NOTIFIER_API", str(notifier.api.base_url))
    monkeypatch.setenv("EDGELOOP_API_TOKEN", TOKEN)
    async with receiving(receiver, port=port):
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["notify", "test", sub])
    assert result.exit_code == 0, result.output
    assert "notify.test" in result.output
    assert "delivered" in result.output
    headers, body = receiver.got[-1]
    assert headers[EVENT_HEADER.lower()] == "notify.test"
    verify(SECRET, headers, body)
    listed_cli = await asyncio.to_thread(CliRunner().invoke, cli, ["notify", "list"])
    assert listed_cli.exit_code == 0, listed_cli.output
    assert sub in listed_cli.output
    assert SECRET not in listed_cli.output
    # the subscription is audited (who, what; no secret)
    conn = await asyncpg.connect(notifier.dsn)
    try:
        row = await conn.fetchrow(
            "SELECT actor, after::text FROM audit.records "
            "WHERE service = 'notifier' AND action = 'notify.subscribe' AND subject = $1",
            f"subscription {sub}",
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["actor"].startswith("token:")
    assert receiver.url in row["after"]
    assert SECRET not in row["after"]


async def test_failing_receiver_retried_then_dead_lettered(
    notifier: Notifier, admin_js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = Receiver(fail_first=1000)
    flaky = Receiver(fail_first=2)  # fails twice, the third attempt gets through
    failing_port = free_port()
    async with receiving(failing, port=failing_port), receiving(flaky):
        dead_sub = await notifier.subscribe(
            failing.url, ["rollout.rolled_back"], format="alertmanager"
        )
        ok_sub = await notifier.subscribe(flaky.url, ["rollout.rolled_back"])
        event = RolloutRolledBack(
            model="iris", version="2.0.0", rollout_id=uuid.uuid4(), reason="wave 1 failed"
        )
        await publish_event(admin_js, event)
        (dead,) = await notifier.settled(dead_sub)
        (ok,) = await notifier.settled(ok_sub)

    # three attempts (max_attempts) at one delivery, then dead
    assert dead["status"] == "dead", dead
    assert dead["attempts"] == 3
    assert len(failing.got) == 3
    assert failing.delivery_ids() == {dead["delivery_id"]}
    assert len({body for _, body in failing.got}) == 1  # the same body every time
    for headers, body in failing.got:
        verify(SECRET, headers, body)
    doc = json.loads(failing.got[0][1])  # the Alertmanager webhook body
    assert doc["version"] == "4"
    assert doc["status"] == "firing"
    (alert,) = doc["alerts"]
    assert alert["labels"]["alertname"] == "EdgeloopRolloutRolledBack"
    assert alert["labels"]["rollout_id"] == str(event.rollout_id)
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["description"] == "wave 1 failed"
    assert alert["startsAt"].startswith(event.occurred_at.strftime("%Y-%m-%dT%H:%M:%S"))

    # the attempt log says how each went
    shown = (await notifier.api.get(f"/v1/deliveries/{dead['delivery_id']}")).json()
    assert [a["status_code"] for a in shown["attempt_log"]] == [500, 500, 500]
    assert (await notifier.deliveries(status="dead")) == [dead]

    # the flaky receiver got it on the third attempt
    assert ok["status"] == "delivered", ok
    assert ok["attempts"] == 3
    assert len(flaky.got) == 3

    # and Prometheus sees it (the health port's /metrics)
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{notifier.svc.health.port}/metrics")).text
    dead_total = next(
        line
        for line in metrics.splitlines()
        if line.startswith('edgeloop_notifier_deliveries_total{status="dead"}')
    )
    assert float(dead_total.rsplit(" ", 1)[1]) >= 1

    # the CLI shows the dead delivery in the log
    monkeypatch.setenv("EDGELOOP_NOTIFIER_API", str(notifier.api.base_url))
    monkeypatch.setenv("EDGELOOP_API_TOKEN", TOKEN)
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, ["notify", "deliveries", dead_sub, "--status", "dead"]
    )
    assert result.exit_code == 0, result.output
    assert dead["delivery_id"] in result.output
    assert "dead" in result.output
    assert "HTTP 500" in result.output

    # the receiver mended (it fails once more, then answers), a person retries it: the
    # same delivery, another round of 3 attempts
    failing.fail_first = 4
    async with receiving(failing, port=failing_port):
        result = await asyncio.to_thread(
            CliRunner().invoke, cli, ["notify", "retry", dead["delivery_id"]]
        )
        assert result.exit_code == 0, result.output
        (retried,) = await notifier.settled(dead_sub)
        assert retried["status"] == "delivered", retried
    assert retried["attempts"] == 5
    assert len(failing.got) == 5
    assert failing.delivery_ids() == {dead["delivery_id"]}
    again = await notifier.api.post(f"/v1/deliveries/{dead['delivery_id']}/retry")
    assert again.status_code == 409  # not dead any more

    # finished deliveries go after the retention, their attempts with them
    store = PgDeliveries(lambda: notifier.svc.pool)
    assert await store.prune(3600) == 0
    assert await store.prune(0) == 2
    assert await notifier.deliveries() == []
    gone = await notifier.api.get(f"/v1/deliveries/{dead['delivery_id']}")
    assert gone.status_code == 404


async def test_restart_mid_delivery_doubles_nothing(
    notifier: Notifier, admin_js: JetStreamContext
) -> None:
    receiver = Receiver(hold=asyncio.Event())
    async with receiving(receiver):
        sub = await notifier.subscribe(receiver.url, ["alarm.raised"])
        alarm = new_alarm()
        await publish_event(admin_js, alarm)
        await asyncio.wait_for(receiver.arrived.wait(), 30)  # the POST is in flight
        # stopped while the receiver has not answered: nothing recorded yet
        await notifier.svc.stop()
        receiver.hold.set()  # type: ignore[union-attr]
        receiver.hold = None
        # the same event again, as a redelivery (another message id, the same event id)
        await admin_js.publish(
            "alarm.raised", alarm.to_json(), headers={"Nats-Msg-Id": str(uuid.uuid4())}
        )
        notifier.svc = build(notifier.settings)
        await notifier.svc.start()
        await eventually(lambda: api_up(notifier.api), what="the notifier API again")
        rows = await notifier.settled(sub)

    # one delivery, sent again after the restart under the same id
    assert len(rows) == 1, rows
    assert rows[0]["status"] == "delivered"
    assert receiver.delivery_ids() == {rows[0]["delivery_id"]}
    assert len(receiver.got) == 2  # the interrupted POST and the one that was answered
    shown = (await notifier.api.get(f"/v1/deliveries/{rows[0]['delivery_id']}")).json()
    assert [a["status_code"] for a in shown["attempt_log"]] == [204]


async def test_viewer_lists_but_cannot_add_and_bad_urls_refused(
    notifier: Notifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await asyncpg.connect(notifier.dsn)
    try:
        async with conn.transaction():
            viewer = await issue_token(
                conn, name="vera", role="viewer", actor="test", expires_in=None, service="test"
            )
    finally:
        await conn.close()
    as_viewer = {"Authorization": f"Bearer {viewer['token']}"}
    body = {"url": "http://127.0.0.1:9/hook", "events": ["alarm.raised"], "secret": SECRET}

    listed = await notifier.api.get("/v1/subscriptions", headers=as_viewer)
    assert listed.status_code == 200
    refused = await notifier.api.post("/v1/subscriptions", json=body, headers=as_viewer)
    assert refused.status_code == 403
    assert "operator" in refused.json()["detail"]

    for url in ("ftp://example.com/hook", "file:///etc/passwd", "javascript:alert(1)"):
        resp = await notifier.api.post("/v1/subscriptions", json={**body, "url": url})
        assert resp.status_code == 422, (url, resp.text)
        assert "http:// or https://" in resp.text
    # the CLI says why too
    monkeypatch.setenv("EDGELOOP_NOTIFIER_API", str(notifier.api.base_url))
    monkeypatch.setenv("EDGELOOP_API_TOKEN", TOKEN)
    args = ["notify", "add", "--url", "ftp://example.com/x", "--events", "alarm.raised"]
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert result.exit_code == 1
    assert "http:// or https://" in result.output
    resp = await notifier.api.post("/v1/subscriptions", json={**body, "events": ["alarm.rang"]})
    assert resp.status_code == 422
    assert "unknown events alarm.rang" in resp.text
    assert (await notifier.api.get("/v1/subscriptions")).json()["subscriptions"] == []


async def test_postgres_outage_spends_no_attempt_and_dead_letters_nothing(
    nats_url: str, postgres_private: Postgres, admin_js: JetStreamContext, unique: str
) -> None:
    dsn = await asyncio.to_thread(postgres_private.create_database, f"n_{unique}")
    receiver = Receiver(hold=asyncio.Event())
    async with receiving(receiver), running_notifier(nats_url, dsn) as notifier:
        sub = await notifier.subscribe(receiver.url, ["alarm.raised"])
        first, second = new_alarm(), new_alarm()
        await publish_event(admin_js, first)
        await asyncio.wait_for(receiver.arrived.wait(), 30)
        # PostgreSQL goes while the POST is in flight: its answer cannot be recorded
        await asyncio.to_thread(postgres_private.kill)
        receiver.hold.set()  # type: ignore[union-attr]
        receiver.hold = None
        await publish_event(admin_js, second)  # an event during the outage
        await asyncio.sleep(3)  # the outage (longer than 3 attempts' back-off)
        await asyncio.to_thread(postgres_private.start)
        rows = await notifier.settled(sub, count=2)

    assert sorted(r["status"] for r in rows) == ["delivered", "delivered"], rows
    assert {r["event_id"] for r in rows} == {str(first.event_id), str(second.event_id)}
    by_event = {r["event_id"]: r for r in rows}
    # the first one's unrecorded answer is sent again under the same delivery id
    again = [
        h
        for h, _ in receiver.got
        if h[DELIVERY_HEADER.lower()] == by_event[str(first.event_id)]["delivery_id"]
    ]
    assert len(again) == 2
    assert all(r["attempts"] == 1 for r in rows), rows
    dead = await stream_messages(admin_js, s.STREAM_DLQ, f"dlq.{s.ALARM_RAISED}")
    ours = {str(first.event_id), str(second.event_id)}
    assert not [m for m in dead if json.loads(m.data).get("event_id") in ours]


async def test_sigkill_mid_delivery_sends_it_again_once(
    nats_url: str, private_dsn: str, admin_js: JetStreamContext, tmp_path: Path
) -> None:
    api_port = free_port()
    env = {
        "EDGELOOP_NATS_URL": nats_url,
        "EDGELOOP_DATABASE_URL": private_dsn,
        "EDGELOOP_NOTIFIER_API_TOKENS": TOKEN,
        "EDGELOOP_NOTIFIER_API_PORT": str(api_port),
        "EDGELOOP_NOTIFIER_POLL_SECONDS": "0.05",
        "EDGELOOP_NOTIFIER_REQUEST_TIMEOUT_SECONDS": "5",
        "EDGELOOP_NOTIFIER_LEASE_SECONDS": "1",  # at least the timeout + 5 s: 10 s
    }
    proc = ServiceProcess("notifier", "edgeloop.notifier", free_port(), env, tmp_path / "n.log")
    receiver = Receiver(hold=asyncio.Event())
    api = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    try:
        async with receiving(receiver), api:
            proc.start()
            await eventually(lambda: api_up(api), within=60, what="the notifier process")
            notifier = NotifierApi(api)
            sub = await notifier.subscribe(receiver.url, ["alarm.raised"])
            await publish_event(admin_js, new_alarm())
            await asyncio.wait_for(receiver.arrived.wait(), 30)
            await asyncio.to_thread(proc.kill)  # SIGKILL while the POST is unanswered
            receiver.hold.set()  # type: ignore[union-attr]
            receiver.hold = None
            proc.start()
            await eventually(lambda: api_up(api), within=60, what="the notifier again")
            rows = await notifier.settled(sub)
    finally:
        await asyncio.to_thread(proc.kill)

    assert len(rows) == 1, rows
    assert rows[0]["status"] == "delivered", rows
    assert receiver.delivery_ids() == {rows[0]["delivery_id"]}
    assert len(receiver.got) == 2
    assert rows[0]["attempts"] == 1


async def test_an_event_wrong_for_its_subject_is_dead_lettered_with_why(
    notifier: Notifier, admin_js: JetStreamContext
) -> None:
    sub = await notifier.subscribe("http://127.0.0.1:9/unused", ["alarm.raised"])
    # an event (id, time) but not an alarm: no alarm_id, kind or rule
    wrong = RolloutRolledBack(model="iris", version="1", rollout_id=uuid.uuid4(), reason="x")
    await admin_js.publish(
        s.ALARM_RAISED, wrong.to_json(), headers={"Nats-Msg-Id": str(wrong.event_id)}
    )

    async def dead_letter() -> Any:
        for msg in await stream_messages(admin_js, s.STREAM_DLQ, f"dlq.{s.ALARM_RAISED}"):
            if json.loads(msg.data).get("event_id") == str(wrong.event_id):
                return msg
        return None

    msg = await eventually(dead_letter, what="the dead letter")
    reason = msg.headers[DLQ_REASON]
    assert "alarm_id" in reason, reason
    assert msg.headers[DLQ_CONSUMER] == s.CONSUMER_NOTIFIER
    assert await notifier.deliveries(subscription=sub) == []
