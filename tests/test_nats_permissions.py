"""Per-service NATS users: each service may publish only its own events (and the dead
letters of what it consumes), read only its streams and write only its buckets; the
server refuses everything else. On a server of the test's own, with the platform's
users as ``make up`` configures them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig

from edgeloop.builder.app import build as build_builder
from edgeloop.builder.config import BuilderSettings
from edgeloop.contracts import subjects as s
from edgeloop.contracts.access import BOOTSTRAP, SERVICES, inbox_prefix, stream_of
from edgeloop.devstack.nats_auth import NatsAuth
from edgeloop.devstack.servers import NatsServer
from edgeloop.devstack.testing import stream_messages
from edgeloop.kit.oci.signing import generate_keypair

ALL_EVENTS = (
    s.MODEL_COMMITTED,
    s.IMAGE_BUILT,
    s.IMAGE_BUILD_FAILED,
    s.VALIDATION_PASSED,
    s.VALIDATION_FAILED,
    s.ROLLOUT_REQUESTED,
    s.ROLLOUT_WAVE_STARTED,
    s.ROLLOUT_COMPLETED,
    s.ROLLOUT_APPROVED,
    s.ROLLOUT_CANARY_VERDICT,
    s.ALARM_RAISED,
    s.RETRAIN_REQUESTED,
    s.telemetry_subject("m", "d"),
    s.device_status_subject("d"),
    s.dlq_subject(s.MODEL_COMMITTED),
)


def _owns(service: str, subject: str) -> bool:
    access = SERVICES[service]
    own = [*access.publishes, *(s.dlq_subject(c) for c in access.consumes)]
    return any(_matches(pattern, subject) for pattern in own)


def _matches(pattern: str, subject: str) -> bool:
    p, t = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(p) == len(t)


class Session:
    """A connection as one user, keeping the errors the server sends it."""

    def __init__(self, nc: Client, errors: list[Exception]) -> None:
        self.nc = nc
        # a refused request gets no answer: wait for one only briefly
        self.js = nc.jetstream(timeout=2)
        self.errors = errors

    async def publish(self, subject: str) -> bool:
        """Whether the stream stored a message published on ``subject``."""
        try:
            await self.js.publish(subject, b"{}", timeout=1)
        except nats.errors.TimeoutError:
            return False
        return True


@contextlib.asynccontextmanager
async def _as(server: NatsServer, auth: NatsAuth, name: str) -> AsyncIterator[Session]:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    user = auth.user(name)
    nc = await nats.connect(
        server.url,
        user=user.name,
        password=user.password,
        error_cb=on_error,
        name=name,
        inbox_prefix=inbox_prefix(name) if name != "admin" else "_INBOX",
    )
    try:
        yield Session(nc, errors)
    finally:
        await nc.close()


@pytest.fixture
async def bus(nats_private: NatsServer) -> NatsServer:
    """A server whose topology the bootstrap user declared (the fixture did)."""
    return nats_private


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_a_service_publishes_its_own_events_and_no_others(
    bus: NatsServer, nats_auth: NatsAuth, service: str
) -> None:
    async with _as(bus, nats_auth, service) as me:
        # all at once: each refusal costs a wait for an ack that never comes
        stored = await asyncio.gather(*(me.publish(subject) for subject in ALL_EVENTS))
        await asyncio.sleep(0.05)
        for subject, was_stored in zip(ALL_EVENTS, stored, strict=True):
            assert was_stored == _owns(service, subject), (service, subject)
            if not was_stored:
                assert any(
                    "permissions violation" in str(e) and subject in str(e) for e in me.errors
                ), me.errors
    async with _as(bus, nats_auth, "admin") as admin:
        for subject in ALL_EVENTS:
            stream = stream_of(subject)
            # telemetry is stored under its partition: one token more
            stored_as = f"{subject}.*" if stream == s.STREAM_TELEMETRY else subject
            stored = await stream_messages(admin.js, stream, stored_as)
            assert bool(stored) == _owns(service, subject), (service, subject)


async def test_a_service_cannot_read_or_remove_what_is_not_its_own(
    bus: NatsServer, nats_auth: NatsAuth
) -> None:
    async with _as(bus, nats_auth, "builder") as builder:
        with pytest.raises(nats.errors.TimeoutError):  # the request never reaches JetStream
            await builder.js.add_consumer(
                s.STREAM_TELEMETRY, ConsumerConfig(durable_name="peek"), timeout=1
            )
        with pytest.raises(nats.errors.TimeoutError):
            await builder.js.delete_stream(s.STREAM_LIFECYCLE)
        with pytest.raises(nats.errors.TimeoutError):
            await builder.js.purge_stream(s.STREAM_LIFECYCLE)
        # nor subscribe to a subject on core NATS, past the streams
        await builder.nc.subscribe(s.MODEL_COMMITTED)
        await asyncio.sleep(0.1)
        assert any("subscription" in str(e) for e in builder.errors), builder.errors
    async with _as(bus, nats_auth, "gateway") as gateway:
        kv = await gateway.js.key_value(s.KV_REPORTED)
        await kv.put("device-1", b"{}")  # its own bucket
        desired = await gateway.js.key_value(s.KV_DESIRED)
        with pytest.raises(nats.errors.TimeoutError):
            await desired.put("device-1", b"{}")  # the deployer's
    async with _as(bus, nats_auth, "admin") as admin:
        assert (await admin.js.stream_info(s.STREAM_LIFECYCLE)).config.name
        assert "peek" not in {c.name for c in await admin.js.consumers_info(s.STREAM_TELEMETRY)}


async def test_a_running_service_is_refused_a_subject_it_does_not_own(
    bus: NatsServer, nats_auth: NatsAuth, pg_dsn: str, registry_url: str, tmp_path: Path
) -> None:
    """The builder, running with the user its settings name (from the environment the
    harness sets, as ``make up`` sets it), cannot forge a ``model.committed``."""
    private, _ = generate_keypair()
    settings = BuilderSettings(
        nats_url=bus.url,
        database_url=pg_dsn,
        oci_registry_url=registry_url,
        signing_key=private.decode(),
    )
    assert settings.nats_user == "builder"
    svc = build_builder(settings)
    async with svc.running():
        with pytest.raises(nats.errors.TimeoutError):
            await svc.js.publish(s.MODEL_COMMITTED, b"{}", timeout=1)
        ack = await svc.js.publish(s.IMAGE_BUILD_FAILED, b"{}", timeout=5)
        assert ack.stream == s.STREAM_LIFECYCLE
    async with _as(bus, nats_auth, "admin") as admin:
        assert await stream_messages(admin.js, s.STREAM_LIFECYCLE, s.MODEL_COMMITTED) == []
    # the server's log names who was refused what
    assert '"$G/user:builder" - Publish Violation - Subject "model.committed"' in (
        bus.log_path.read_text()
    )


async def _refused(call: Awaitable[object]) -> bool:
    """Whether the server refused ``call`` (a refused request is never answered)."""
    try:
        await call
    except nats.errors.TimeoutError:
        return True
    return False


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_a_service_cannot_change_the_topology_or_another_services_consumers(
    bus: NatsServer, nats_auth: NatsAuth, service: str
) -> None:
    """Least privilege on the bus (issue 16): no topology changes, only its own durables,
    replies only on its own inbox prefix."""
    others = [d for name, a in SERVICES.items() if name != service for d in a.durables]
    theirs = next(d for d in others if stream_of_durable(d) == s.STREAM_LIFECYCLE)
    async with _as(bus, nats_auth, "admin") as admin:  # another service's durable exists
        await admin.js.add_consumer(s.STREAM_LIFECYCLE, ConsumerConfig(durable_name=theirs))
    async with _as(bus, nats_auth, service) as me:
        info = await me.js.stream_info(s.STREAM_LIFECYCLE)  # it may look
        limits = dataclasses.replace(info.config, max_age=1.0)
        assert await _refused(me.js.update_stream(config=limits))
        assert await _refused(me.js.delete_consumer(s.STREAM_LIFECYCLE, theirs))
        assert await _refused(me.js.consumer_info(s.STREAM_LIFECYCLE, theirs, timeout=1))
        redefined = ConsumerConfig(durable_name=theirs, filter_subject=s.MODEL_COMMITTED)
        assert await _refused(me.js.add_consumer(s.STREAM_LIFECYCLE, redefined, timeout=1))
        await me.nc.subscribe("_INBOX.>")  # everyone's replies
        await me.nc.subscribe(f"{inbox_prefix('admin')}.>")
        await asyncio.sleep(0.2)
        refused = [str(e) for e in me.errors if "subscription" in str(e).lower()]
        assert len(refused) >= 2, me.errors
        # its own durables it may declare and look up
        access = SERVICES[service]
        for durable in access.durables[:1]:
            stream = stream_of(access.consumes[0])
            subject = access.consumes[0] if stream != s.STREAM_TELEMETRY else None
            config = ConsumerConfig(durable_name=durable, filter_subject=subject)
            await me.js.add_consumer(stream, config, timeout=5)
            assert (await me.js.consumer_info(stream, durable, timeout=5)).name == durable
    async with _as(bus, nats_auth, "admin") as admin:
        info = await admin.js.stream_info(s.STREAM_LIFECYCLE)
        assert info.config.max_age != 1.0
        assert theirs in {c.name for c in await admin.js.consumers_info(s.STREAM_LIFECYCLE)}


async def test_only_the_bootstrap_declares_the_topology(
    nats_private: NatsServer, nats_auth: NatsAuth
) -> None:
    async with _as(nats_private, nats_auth, BOOTSTRAP) as boot:
        info = await boot.js.stream_info(s.STREAM_DLQ)
        await boot.js.update_stream(config=info.config)  # may bring it up to date
        assert await _refused(boot.js.delete_stream(s.STREAM_DLQ))
        assert await _refused(boot.js.publish(s.MODEL_COMMITTED, b"{}", timeout=1))


def stream_of_durable(durable: str) -> str:
    """The stream a platform durable consumes (telemetry partitions: TELEMETRY)."""
    return (
        s.STREAM_TELEMETRY
        if durable.startswith(s.CONSUMER_MONITOR_TELEMETRY)
        else (s.STREAM_LIFECYCLE)
    )
