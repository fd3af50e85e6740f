"""The DLQ as a queue to act on, against the real registry service (NATS, PostgreSQL):
``edgeloop dlq list|show|replay`` on events the registry dead-lettered, replays audited
and exactly-once, and dead letters dropped by the DLQ's byte limit counted and logged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats as nats_py
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import REGISTRY as METRICS
from typer.testing import CliRunner, Result

from edgeloop.cli.main import app
from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import DatasetSelection, RetrainRequested
from edgeloop.devstack.nats_auth import NatsAuth
from edgeloop.devstack.servers import NatsServer
from edgeloop.devstack.testing import eventually, publish_event
from edgeloop.kit.service import Service
from tests.deploy_harness import register_version, registry_service
from tests.edge_harness import TOKEN
from tests.modelzoo import classifier


@dataclass
class Stack:
    """The registry on a private NATS and database, and the CLI pointed at them."""

    svc: Service
    api: httpx.AsyncClient
    nc: Client
    js: JetStreamContext
    env: dict[str, str]
    unique: str
    model: str
    """The model of the test's retrain requests (not registered until it registers it)."""

    async def cli(self, *args: str, token: str = TOKEN) -> Result:
        env = {**self.env, "EDGELOOP_API_TOKEN": token}
        return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)

    async def token(self, name: str, role: str) -> str:
        resp = await self.api.post("/api/v1/tokens", json={"name": name, "role": role})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["token"])

    async def dead_letters(self, n: int) -> list[dict[str, Any]]:
        """Wait until ``n`` dead letters of retrain.requested are listed; them."""

        async def listed() -> tuple[list[dict[str, Any]]] | None:
            result = await self.cli("dlq", "list", "--subject", s.RETRAIN_REQUESTED, "--json")
            assert result.exit_code == 0, result.output
            rows: list[dict[str, Any]] = json.loads(result.output)
            return (rows,) if len(rows) == n else None

        (rows,) = await eventually(listed, within=30, what=f"{n} dead letters")
        return rows

    async def retrain(self, **extra: Any) -> RetrainRequested:
        event = RetrainRequested(
            model=self.model,
            version="1",
            request_id=uuid.uuid4(),
            reason="drift",
            dataset=DatasetSelection(kinds=["low-confidence"]),
            **extra,
        )
        await publish_event(self.js, event)
        return event

    async def requests(self, event: RetrainRequested) -> int:
        return int(
            await self.svc.pool.fetchval(
                "SELECT count(*) FROM registry.retrain_requests WHERE request_id = $1",
                event.request_id,
            )
        )

    async def register(self) -> None:
        await register_version(self.api, self.model, "1", classifier("iris").onnx)

    async def lifecycle_last(self) -> int:
        return int((await self.js.stream_info(s.STREAM_LIFECYCLE)).state.last_seq)

    async def replays(self) -> list[dict[str, Any]]:
        trail = (await self.api.get("/api/v1/audit", params={"limit": 1000})).json()["records"]
        return [r for r in trail if r["action"] == "dlq.replay"]


@contextlib.asynccontextmanager
async def running_registry(
    nats: NatsServer, dsn: str, unique: str, registry_url: str
) -> AsyncIterator[Stack]:
    nc = await nats_py.connect(nats.url)  # as the admin, like the CLI
    try:
        async with registry_service(nats.url, dsn, registry_url, unique, dlq_check_seconds=0.2) as (
            svc,
            api,
        ):
            env = {
                "EDGELOOP_NATS_URL": nats.url,
                "EDGELOOP_REGISTRY_API": str(api.base_url).rstrip("/"),
            }
            yield Stack(svc, api, nc, nc.jetstream(), env, unique, f"dlq{unique}")
    finally:
        await nc.close()


@pytest.fixture
async def stack(
    nats_private: NatsServer, private_dsn: str, unique: str, registry_url: str
) -> AsyncIterator[Stack]:
    async with running_registry(nats_private, private_dsn, unique, registry_url) as st:
        yield st


async def test_dead_letters_are_listed_shown_and_replayed_once_their_cause_is_fixed(
    stack: Stack,
) -> None:
    model = stack.model
    event = await stack.retrain()
    (row,) = await stack.dead_letters(1)
    assert row["consumer"] == s.CONSUMER_REGISTRY_RETRAIN
    assert row["event_id"] == str(event.event_id)
    assert "not registered" in row["reason"]
    dead = str(row["id"])

    shown = await stack.cli("dlq", "show", dead)
    assert shown.exit_code == 0, shown.output
    assert f"{model}@1, which is not registered" in shown.output
    assert str(event.request_id) in shown.output  # the payload
    table = await stack.cli("dlq", "list", "--since", "1h")
    assert dead in table.output
    assert "registry-retrain" in table.output
    assert "no dead letters" in (await stack.cli("dlq", "list", "--subject", "model.>")).output

    # a dry run says what it would do and changes nothing
    published = await stack.lifecycle_last()
    dry = await stack.cli("dlq", "replay", "--id", dead, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"would replay #{dead} {s.RETRAIN_REQUESTED} event {event.event_id}" in dry.output
    assert await stack.lifecycle_last() == published
    assert await stack.replays() == []
    assert [r["id"] for r in await stack.dead_letters(1)] == [row["id"]]

    # a viewer may look but not replay: refused before anything is published
    viewer = await stack.token(f"vera-{stack.unique}", "viewer")
    refused = await stack.cli("dlq", "replay", "--id", dead, token=viewer)
    assert refused.exit_code == 1
    assert "operator or admin" in refused.output
    assert await stack.lifecycle_last() == published

    # replayed before the cause is fixed: dead-lettered again, which replaces it
    operator = await stack.token(f"otto-{stack.unique}", "operator")
    again = await stack.cli("dlq", "replay", "--subject", s.RETRAIN_REQUESTED, token=operator)
    assert again.exit_code == 1, again.output
    assert "dead-lettered again as #" in again.output
    (row2,) = await stack.dead_letters(1)
    assert row2["id"] != row["id"]
    assert row2["event_id"] == str(event.event_id)
    assert await stack.requests(event) == 0

    # the cause fixed (the version registered), the replay has its effect once
    await stack.register()
    done = await stack.cli("dlq", "replay", "--subject", s.RETRAIN_REQUESTED, token=operator)
    assert done.exit_code == 0, done.output
    assert "acked by registry-retrain" in done.output
    assert "removed from the DLQ" in done.output
    assert await stack.requests(event) == 1
    assert await stack.dead_letters(0) == []

    # each replay is on the record, by the operator's token, with its outcome
    records = await stack.replays()
    outcomes = [(r["after"]["dlq_seq"], r["after"]["outcome"]) for r in records]
    assert outcomes == [
        (row["id"], "replaying"),
        (row["id"], "dead_lettered_again"),
        (row2["id"], "replaying"),
        (row2["id"], "acked"),
    ]
    assert {r["actor"] for r in records} == {f"otto-{stack.unique}"}
    assert {r["subject"] for r in records} == {s.RETRAIN_REQUESTED}
    assert {r["after"]["event_id"] for r in records} == {str(event.event_id)}
    assert {(r["model"], r["version"]) for r in records} == {(model, "1")}
    log = await stack.cli("audit", "log", "--model", f"{model}@1")
    assert log.output.count("dlq.replay") == 4, log.output


async def test_an_applied_event_is_not_applied_twice_and_an_unacked_replay_stays(
    stack: Stack,
) -> None:
    event = await stack.retrain()
    (row,) = await stack.dead_letters(1)
    dead = str(row["id"])
    await stack.register()
    # the producer sends the event again (as itself, after the duplicate window): applied
    await stack.js.publish(s.RETRAIN_REQUESTED, event.to_json())
    await eventually(lambda: stack.requests(event), what="the re-sent event applied")

    # the consumer does not acknowledge in time: the replay stays in the DLQ
    until = (datetime.now(UTC) + timedelta(minutes=2)).isoformat().replace("+00:00", "Z")
    await stack.js.pause_consumer(s.STREAM_LIFECYCLE, s.CONSUMER_REGISTRY_RETRAIN, until)
    late = await stack.cli("dlq", "replay", "--id", dead, "--timeout", "1")
    assert late.exit_code == 1, late.output
    assert "not acked" in late.output
    assert "still in the DLQ" in late.output
    assert [r["id"] for r in await stack.dead_letters(1)] == [row["id"]]
    assert (await stack.replays())[-1]["after"]["outcome"] == "not_acked"

    # acknowledged once the consumer is back; its inbox knew the event: no second effect
    await stack.js.resume_consumer(s.STREAM_LIFECYCLE, s.CONSUMER_REGISTRY_RETRAIN)
    done = await stack.cli("dlq", "replay", "--id", dead)
    assert done.exit_code == 0, done.output
    assert await stack.dead_letters(0) == []
    assert await stack.requests(event) == 1
    outcomes = [r["after"]["outcome"] for r in await stack.replays()]
    assert outcomes == ["replaying", "not_acked", "replaying", "acked"]


async def test_dead_letters_dropped_by_the_byte_limit_are_counted_and_logged(
    nats_private: NatsServer,
    private_dsn: str,
    unique: str,
    registry_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    nats_auth: NatsAuth,
) -> None:
    monkeypatch.setenv("EDGELOOP_DLQ_MAX_BYTES", "6000")  # about three dead letters
    # the limits are the bootstrap's to set, as make up and Compose run it
    await asyncio.to_thread(nats_auth.bootstrap, nats_private.url)
    caplog.set_level(logging.WARNING, logger="edgeloop.registry.deadletters")
    dropped_before = METRICS.get_sample_value("edgeloop_dlq_dropped_total") or 0.0
    async with running_registry(nats_private, private_dsn, unique, registry_url) as stack:
        config = (await stack.js.stream_info(s.STREAM_DLQ)).config
        assert config.max_bytes == 6000
        for _ in range(6):
            await stack.retrain(evidence={"pad": "x" * 1500})

        async def settled() -> int | None:
            state = (await stack.js.stream_info(s.STREAM_DLQ)).state
            return state.messages if state.last_seq == 6 else None

        kept = await eventually(settled, within=30, what="six dead letters")
        assert 0 < kept < 6
        # what is left is replayed (its removal is no drop), and nothing else goes
        await stack.register()
        done = await stack.cli("dlq", "replay", "--subject", s.RETRAIN_REQUESTED)
        assert done.exit_code == 0, done.output

        async def counted() -> float | None:
            now = METRICS.get_sample_value("edgeloop_dlq_dropped_total") or 0.0
            first = (await stack.js.stream_info(s.STREAM_DLQ)).state.first_seq
            watched = await stack.svc.pool.fetchval("SELECT first_seq FROM registry.dlq_watch")
            return now - dropped_before if first == watched == 7 else None

        assert await eventually(counted, within=10, what="the drops counted") == 6 - kept
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("dropped" in w and "nobody replayed" in w for w in warnings), warnings
        assert sum(int(w.split("dropped ")[1].split()[0]) for w in warnings) == 6 - kept
