"""PostgreSQL down for a minute under the whole telemetry path (agents' batches on NATS,
the monitor's partitioned consumers, the registry) while a version is being built and
validated: nothing is dead-lettered, every batch is counted once when it is back, the
version in flight is validated after, once, and a registration refused meanwhile (503,
retry) succeeds after. NATS down for 20 s mid-rollout: the rollout completes with one
desired-state write per device. The tests have servers of their own to kill."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from nats.js.errors import NoKeysError

from edgeloop.builder.app import build as build_builder
from edgeloop.builder.config import BuilderSettings
from edgeloop.contracts import subjects as s
from edgeloop.devstack.servers import NatsServer, Postgres
from edgeloop.devstack.testing import eventually, publish_event, stream_messages
from edgeloop.kit.oci.signing import generate_keypair
from edgeloop.validator.app import build as build_validator
from edgeloop.validator.config import ValidatorSettings
from tests.deploy_harness import DeployStack
from tests.modelzoo import classifier
from tests.test_monitor import TOKEN, Monitored, _counted, mon, registered_batches  # noqa: F401 (mon is a fixture)

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 60


@pytest.fixture
def private_dsn(postgres_private: Postgres, unique: str) -> str:
    """The monitor fixture's database, on a server this test can kill."""
    return postgres_private.create_database(f"t_{unique}")


@pytest.fixture
async def building(mon: Monitored, registry_url: str, unique: str) -> AsyncIterator[None]:  # noqa: F811
    """The builder and validator beside the monitor fixture's registry (same servers)."""
    private, public = generate_keypair()
    common = {
        "nats_url": mon.settings.nats_url,
        "database_url": mon.settings.database_url,
        "oci_registry_url": registry_url,
    }
    builder = build_builder(
        BuilderSettings(**common, signing_key=private.decode(), image_prefix=f"o{unique}/images")
    )
    validator = build_validator(
        ValidatorSettings(
            **common,
            public_key=public.decode(),
            registry_api=str(mon.registry.base_url).rstrip("/"),
            registry_token=TOKEN,
            profile_threads="1",
            profile_runs=20,
        )
    )
    async with builder.running(), validator.running():
        yield


async def _register(
    registry: httpx.AsyncClient, model: str, version: str, files: Any
) -> httpx.Response:
    return await registry.post(
        f"/api/v1/models/{model}/versions",
        files={
            "model": ("model.onnx", files.onnx),
            "suite": ("suite.npz", files.suite),
            "reference": ("reference.npz", files.reference),
        },
        data={"version": version, "params": '{"threshold.accuracy": "0.85"}'},
    )


@pytest.mark.timeout(360)
async def test_postgres_down_a_minute_loses_and_dead_letters_no_telemetry(
    mon: Monitored,  # noqa: F811
    building: None,
    postgres_private: Postgres,
) -> None:
    batch = await registered_batches(mon)
    m = classifier("iris")

    async def publish(first: int, last: int) -> None:
        for i in range(first, last):
            await publish_event(mon.edge.js, (b := batch(i)), subject=b.bus_subject())

    await publish(0, 100)
    await eventually(lambda: _counted(mon, 100 * 50 - 1), within=60, what="the first batches")
    # v2 is committed; its build and validation are under way when PostgreSQL goes
    registered = await _register(mon.registry, mon.model, "2", m)
    assert registered.status_code in (200, 201), registered.text

    await asyncio.to_thread(postgres_private.kill)
    t0 = time.monotonic()
    refused = await _register(mon.registry, mon.model, "3", m)
    assert refused.status_code == 503, refused.text
    for k in range(6):  # a fleet streaming through the outage
        await publish(100 + 50 * k, 150 + 50 * k)
        await asyncio.sleep(OUTAGE_SECONDS / 6)
    ready, checks = await mon.service.health.readiness()
    assert not ready, checks
    dead = await stream_messages(mon.edge.js, s.STREAM_DLQ, "dlq.>")
    assert dead == [], f"{len(dead)} messages dead-lettered during the outage"
    await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - t0)))
    await asyncio.to_thread(postgres_private.start)

    await eventually(
        lambda: _counted(mon, 400 * 50 - 1), within=90, what="every batch counted after"
    )
    await asyncio.sleep(2)  # nothing arrives twice later
    assert await _counted(mon) == 400 * 50

    async def retried() -> bool:
        resp = await _register(mon.registry, mon.model, "3", m)
        return resp.status_code in (200, 201)

    await eventually(retried, within=30, what="the registration retried after the outage")

    for version in ("2", "3"):
        body: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            resp = await mon.registry.get(f"/api/v1/models/{mon.model}/versions/{version}")
            body = dict(resp.json())
            if body["validation_state"] != "pending":
                break
            await asyncio.sleep(0.5)
        assert body["validation_state"] == "passed", (version, body)
    assert await stream_messages(mon.edge.js, s.STREAM_DLQ, "dlq.>") == []
    conn = await asyncpg.connect(mon.settings.database_url)
    try:  # each version built and validated once
        for table in ("builder.builds", "validator.reports"):
            rows = await conn.fetch(
                f"SELECT version, count(*) AS n FROM {table} WHERE model = $1 GROUP BY version",
                mon.model,
            )
            counts = {r["version"]: r["n"] for r in rows if r["version"] != "1"}
            assert counts == {"2": 1, "3": 1}, (table, counts)
    finally:
        await conn.close()
    ready, checks = await mon.service.health.readiness()
    assert ready, checks


async def test_nats_down_20s_mid_rollout_the_rollout_completes_with_one_write_per_device(
    deploy: DeployStack, nats_private: NatsServer
) -> None:
    sel = {"fleet": deploy.unique}
    devices = await deploy.devices(4, sel)
    model = f"iris{deploy.unique}"
    v1 = await deploy.validated(model, "1", classifier("iris").onnx)
    code, body = await deploy.start(
        model,
        "1",
        sel,
        waves=[{"count": 1}, {"percent": 50}, {"percent": 100}],
        bake_seconds=2,
        converge_timeout_seconds=120,
    )
    assert code == 201, body
    rid = body["rollout_id"]

    await deploy.in_wave(rid, 1)
    await asyncio.to_thread(nats_private.kill)
    await asyncio.sleep(20)
    await asyncio.to_thread(nats_private.start)
    done = await deploy.wait_rollout(rid, "completed", "rolled_back", within=180)
    assert done["state"] == "completed", done["reason"]
    await deploy.running(devices, v1)
    started = [e for e in await deploy.events("rollout.wave.started") if e["rollout_id"] == rid]
    assert sorted(e["wave"] for e in started) == [0, 1, 2]  # each wave started once
    dead = await stream_messages(deploy.edge.js, s.STREAM_DLQ, "dlq.>")
    assert dead == [], [m.headers for m in dead]
    # one desired-state write of this version per device: none lost, none doubled
    for device, writes in (await _desired_writes(deploy, devices, v1.digest)).items():
        assert writes == 1, f"{device}: {writes} writes of the new version"


async def test_failed_desired_state_writes_are_retried_until_each_device_has_one(
    deploy: DeployStack,
) -> None:
    """The deployer's KV writes fail (fail point ``kv.write``, a dropped connection) the
    first five times: the rollout still completes, each device written exactly once."""
    deploy.deployer.env["EDGELOOP_FAILPOINTS"] = "kv.write=raise:5"
    await deploy.restart_deployer(kill=False)
    sel = {"fleet": deploy.unique}
    devices = await deploy.devices(3, sel)
    model = f"iris{deploy.unique}"
    v1 = await deploy.validated(model, "1", classifier("iris").onnx)
    code, body = await deploy.start(model, "1", sel, waves=[{"percent": 100}], bake_seconds=0)
    assert code == 201, body
    done = await deploy.wait_rollout(body["rollout_id"], "completed", "rolled_back", within=120)
    assert done["state"] == "completed", done["reason"]
    await deploy.running(devices, v1)
    assert "fail point kv.write" in deploy.deployer.log_path.read_text()
    for device, writes in (await _desired_writes(deploy, devices, v1.digest)).items():
        assert writes == 1, f"{device}: {writes} writes of the version"


async def _desired_writes(deploy: DeployStack, devices: list[str], digest: str) -> dict[str, int]:
    """How many times each device's desired state was written with ``digest`` (the KV
    history; read again while a just-restarted server still answers with no keys)."""
    kv = await deploy.edge.js.key_value(s.KV_DESIRED)

    async def writes(device: str) -> int | None:
        try:
            history = await kv.history(s.kv_key(device))
        except NoKeysError:
            return None
        return len([e for e in history if e.value and digest.encode() in e.value])

    out = {}
    for device in devices:
        out[device] = await eventually(lambda d=device: writes(d), what=f"{device}'s history")
    return out
