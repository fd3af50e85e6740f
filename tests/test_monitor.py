"""The monitor against real components: agents (the gateway, mTLS, real models on the
reference profile's bins) stream telemetry over NATS JetStream; the registry service
serves the reference profile; the monitor service aggregates windows in PostgreSQL,
judges them, raises and resolves alarms and asks for retraining."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from edgeloop.cli.main import app
from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import Histogram, RetrainRequested, TelemetryBatch
from edgeloop.devstack.servers import NatsServer, free_port
from edgeloop.devstack.testing import api_up, eventually, publish_event, stream_messages
from edgeloop.devstack.up import ServiceProcess
from edgeloop.edge.agent import Agent
from edgeloop.kit.consumer import DLQ_REASON
from edgeloop.kit.service import Service
from edgeloop.monitor.app import build as build_monitor
from edgeloop.monitor.config import MonitorSettings
from edgeloop.registry.app import build as build_registry
from edgeloop.registry.config import RegistrySettings
from examples.retrain import handle
from tests.deploy_harness import lifecycle_events, register_version
from tests.edge_harness import TOKEN, EdgeStack, edge_stack, wait_state
from tests.modelzoo import classifier

pytestmark = pytest.mark.slow
RUNNING = 4  # pb.DEVICE_STATE_RUNNING


@dataclass
class Monitored:
    edge: EdgeStack
    registry: httpx.AsyncClient
    monitor: httpx.AsyncClient
    model: str
    settings: MonitorSettings
    service: Service

    async def alarms(self, **params: Any) -> list[dict[str, Any]]:
        resp = await self.monitor.get("/v1/alarms", params={"model": self.model, **params})
        assert resp.status_code == 200, resp.text
        return list(resp.json()["alarms"])


@pytest.fixture
async def mon(
    nats_private: NatsServer, private_dsn: str, registry_url: str, tmp_path: Path, unique: str
) -> AsyncIterator[Monitored]:
    dsn = private_dsn
    common = {"nats_url": nats_private.url, "database_url": dsn, "oci_registry_url": registry_url}
    reg_port, mon_port = free_port(), free_port()
    registry = build_registry(
        RegistrySettings(
            **common, api_tokens=TOKEN, api_port=reg_port, repository_prefix=f"m{unique}"
        )
    )
    settings = MonitorSettings(
        **common,
        api_tokens=TOKEN,
        api_port=mon_port,
        registry_api=f"http://127.0.0.1:{reg_port}",
        registry_token=TOKEN,
        window_seconds=2,
        grace_seconds=0.5,
        evaluate_seconds=0.2,
        partition_lease_seconds=1.5,
    )
    monitor = build_monitor(settings)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        registry.running(),
        monitor.running(),
        edge_stack(nats_private.url, dsn, registry_url, tmp_path / "edge") as edge,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reg_port}", headers=headers, timeout=30
        ) as reg,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{mon_port}", headers=headers, timeout=30
        ) as api,
    ):
        await eventually(lambda: api_up(reg), what="registry API")
        await eventually(lambda: api_up(api), what="monitor API")
        yield Monitored(edge, reg, api, f"iris{unique}", settings, monitor)


async def _deploy(
    mon: Monitored, devices: int, drift: str | None, *, groups: list[str | None] | None = None
) -> list[Agent]:
    """Register iris with its reference, push its image (profile inside), run agents
    (device i drifts when ``drift`` is given and, with ``groups``, is in ``groups[i]``:
    only the first group drifts)."""
    m = classifier("iris")
    profile = await register_version(mon.registry, mon.model, "1", m.onnx, m.reference)
    assert profile is not None
    image = await mon.edge.publish_image(mon.model, "1", m.onnx, profile=profile)
    resp = await mon.monitor.put(
        f"/v1/rules/{mon.model}", json={"min_count": 50, "clear_windows": 2}
    )
    assert resp.status_code == 200, resp.text
    agents = []
    for i in range(devices):
        group = groups[i] if groups else None
        config = await mon.edge.enroll(f"{mon.model}-{i}", {"group": group} if group else None)
        config.telemetry_seconds = 0.5
        config.infer_seconds = 0.05
        config.drift = drift if not groups or group == groups[0] else None
        agent = await mon.edge.start_agent(config)
        await mon.edge.set_desired(config.device_id, image.desired())
        agents.append(agent)
    for agent in agents:
        await wait_state(agent, RUNNING, within=60)
    return agents


async def test_drift_raises_an_alarm_asks_for_retraining_and_resolves(
    mon: Monitored, tmp_path: Path
) -> None:
    agents = await _deploy(mon, 2, "feature=2,shift=3,after=0s,fraction=1.0")

    async def raised() -> list[dict[str, Any]]:
        return [a for a in await mon.alarms(open="true") if a["rule"] == "drift_psi"]

    (alarm,) = await eventually(raised, within=60, what="drift alarm")
    assert alarm["kind"] == "drift"
    assert "petal length" in alarm["message"]  # the shifted feature is named
    assert alarm["scores"]["psi.petal length (cm)"] > 0.25
    events = await _lifecycle(mon, "retrain.requested")
    (request,) = [e for e in events if e["alarm_id"] == alarm["alarm_id"]]
    assert request["evidence"]["rule"] == "drift_psi"
    assert request["dataset"]["kinds"] == ["low-confidence", "random", "labelled"]
    assert "edgeloop data export" in request["dataset"]["export_command"]
    raised_events = [e["alarm_id"] for e in await _lifecycle(mon, "alarm.raised")]
    assert raised_events.count(alarm["alarm_id"]) == 1

    # the loop closes: the stored samples, one labelled by hand, retrain a new version
    samples = (await mon.monitor.get("/v1/samples", params={"model": mon.model})).json()
    assert samples["samples"], "agents send their low-confidence inputs"
    first = samples["samples"][0]
    assert len(first["features"]) == 4
    resp = await mon.monitor.post(f"/v1/samples/{first['sample_id']}/label", json={"label": "2"})
    assert resp.status_code == 200, resp.text
    labelled = (
        await mon.monitor.get("/v1/samples", params={"model": mon.model, "kind": "labelled"})
    ).json()["samples"]
    assert [s["label"] for s in labelled] == ["2"]
    env = {"EDGELOOP_MONITOR_API": str(mon.monitor.base_url), "EDGELOOP_API_TOKEN": TOKEN}
    for name in ("labelled.parquet", "labelled.csv"):
        args = ["data", "export", mon.model, "--kind", "labelled", "-o", str(tmp_path / name)]
        result = await asyncio.to_thread(CliRunner().invoke, app, args, env=env)
        assert result.exit_code == 0, result.output
        assert "1 samples (1 labelled)" in result.output
    table = pq.read_table(tmp_path / "labelled.parquet").to_pylist()
    assert [(row["label"], row["f2"] is not None) for row in table] == [("2", True)]
    new = await handle(
        RetrainRequested.model_validate(request),
        "iris",
        mon.registry,
        mon.monitor,
        collect_seconds=0,
    )
    assert new["version"] == "2"
    assert (new["parent_model"], new["parent_version"]) == (mon.model, "1")
    assert new["retrain_request_id"] == request["request_id"]
    assert int(new["params"]["retrained_on_samples"]) >= 1

    # the windows keep drifting: still one alarm (de-duplication); acknowledge it
    await asyncio.sleep(3)
    assert len(await raised()) == 1
    resp = await mon.monitor.post(f"/v1/alarms/{alarm['alarm_id']}/ack")
    trail = (await mon.registry.get("/api/v1/audit", params={"model": mon.model})).json()
    actions = {r["action"]: r for r in trail["records"]}
    assert actions["alarm.ack"]["subject"] == f"alarm {alarm['alarm_id']}"
    assert actions["alarm.ack"]["after"] == {"state": "acknowledged"}
    assert actions["sample.label"]["after"] == {"label": "2"}
    assert actions["sample.label"]["actor"].startswith("token:")
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "acknowledged"

    # the drift stops: two clean windows later the alarm resolves
    for agent in agents:
        assert agent._source is not None
        agent._source.drift = None  # type: ignore[attr-defined]

    async def resolved() -> bool:
        return any(
            a["alarm_id"] == alarm["alarm_id"] and a["state"] == "resolved"
            for a in await mon.alarms()
        )

    try:
        await eventually(resolved, within=60, what="alarm resolved")
    except AssertionError:
        windows = (await mon.monitor.get("/v1/windows", params={"model": mon.model})).json()
        print(json.dumps([w["scores"] for w in windows["windows"][:3]], indent=1))
        print(await mon.alarms())
        raise
    assert alarm["alarm_id"] in {e["alarm_id"] for e in await _lifecycle(mon, "alarm.resolved")}
    windows = (await mon.monitor.get("/v1/windows", params={"model": mon.model})).json()["windows"]
    judged = [w for w in windows if w["evaluated"] and w["scores"].get("features")]
    assert judged
    assert all(w["count"] > 0 for w in judged)

    # the drift report shows it in pictures
    out = tmp_path / "report.html"
    env = {"EDGELOOP_MONITOR_API": str(mon.monitor.base_url), "EDGELOOP_API_TOKEN": TOKEN}
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["monitor", "report", f"{mon.model}@1", "-o", str(out)], env=env
    )
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.count("<svg") >= 2 * 4  # per feature: histograms and PSI over time
    assert "petal length (cm)" in page
    assert "feature drift: petal length" in page  # the alarm
    assert "http" not in page.split("<body>", 1)[1]  # self-contained: nothing fetched


async def test_bad_telemetry_is_refused_per_device_and_never_poisons_a_window(
    mon: Monitored,
) -> None:
    await _deploy(mon, 1, None)
    good = await eventually(lambda: _counted(mon), within=30, what="a window")
    now = datetime.now(UTC)
    base = {"model": mon.model, "version": "1", "window_start": now, "window_end": now, "count": 10}
    one_feature = [Histogram(edges=[1.0], counts=[5, 5])]
    bad = [
        TelemetryBatch(
            device_id="bad-1", **base, feature_names=["a"], feature_histograms=one_feature
        ),
        TelemetryBatch(device_id="bad-2", **{**base, "model": "nope"}),
        TelemetryBatch(device_id="bad-3", **{**base, "count": 10**9}),
    ]
    for batch in bad:
        await publish_event(mon.edge.js, batch, subject=batch.bus_subject())
    # what does not even parse: negative counts, not JSON, a NaN bin edge (not JSON either:
    # the kit refuses it whatever the field, as it refuses what PostgreSQL cannot store)
    body = (
        await mon.registry.get(f"/api/v1/models/{mon.model}/versions/1", params={"profile": "true"})
    ).json()
    features = body["profile"]["features"]
    nan = json.loads(
        TelemetryBatch(
            device_id="bad-5",
            **base,
            feature_names=[f["name"] for f in features],
            feature_histograms=[
                Histogram(edges=f["edges"], counts=[10] + [0] * len(f["edges"])) for f in features
            ],
        ).model_dump_json()
    )
    nan["feature_histograms"][0]["edges"][0] = "NaN"
    negative = json.loads(bad[0].model_dump_json()) | {"device_id": "bad-4", "count": -10}
    raw = {
        "bad-4": json.dumps(negative).encode(),
        "bad-5": json.dumps(nan).replace('"NaN"', "NaN").encode(),
        "bad-6": b"\x00 not json",
    }
    for device, data in raw.items():
        await mon.edge.js.publish(s.telemetry_subject(mon.model, device), data)

    async def refused() -> dict[str, str] | None:
        rows = (await mon.monitor.get("/v1/rejections")).json()["rejections"]
        codes = {r["device_id"]: r["code"] for r in rows}
        return codes if len(codes) >= 6 else None

    codes = await eventually(refused, within=30, what="rejections")
    assert codes == {
        "bad-1": "feature_count",
        "bad-2": "unknown_model",
        "bad-3": "too_large",
        "bad-4": "malformed",
        "bad-5": "malformed",
        "bad-6": "malformed",
    }
    # what did not parse went to the dead letters too, with the reason
    dead = await stream_messages(mon.edge.js, s.STREAM_DLQ, f"dlq.{s.TELEMETRY_PREFIX}.>")
    reasons = {m.subject.split(".")[4]: (m.headers or {}).get(DLQ_REASON, "") for m in dead}
    assert set(reasons) == {"bad-4", "bad-5", "bad-6"}
    assert "count" in reasons["bad-4"]
    assert "edges.0: nan is not a finite number" in reasons["bad-5"]
    # the monitor kept aggregating the good device
    assert await eventually(lambda: _counted(mon, more_than=good), within=30, what="more windows")


async def registered_batches(mon: Monitored) -> Callable[[int], TelemetryBatch]:
    """Register the monitor's model (iris) and return ``batch(i)``: a telemetry batch of 50
    records on its reference bins from device ``dev-<i % 20>``, all in one window."""
    m = classifier("iris")
    profile = await register_version(mon.registry, mon.model, "1", m.onnx, m.reference)
    assert profile is not None
    edges = [f["edges"] for f in profile["features"]]
    names = [f["name"] for f in profile["features"]]
    start = datetime.now(UTC)

    def batch(i: int) -> TelemetryBatch:
        counts = [[0] * (len(e) + 1) for e in edges]
        for c in counts:
            c[i % len(c)] = 50
        return TelemetryBatch(
            model=mon.model,
            version="1",
            device_id=f"dev-{i % 20}",
            window_start=start,
            window_end=start,
            count=50,
            feature_names=names,
            feature_histograms=[
                Histogram(edges=e, counts=c) for e, c in zip(edges, counts, strict=True)
            ],
        )

    return batch


async def _counted(mon: Monitored, more_than: int = 0) -> int:
    windows = (await mon.monitor.get("/v1/windows", params={"model": mon.model})).json()["windows"]
    total = sum(w["count"] for w in windows)
    return total if total > more_than else 0


async def _query(mon: Monitored, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(mon.settings.database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _lifecycle(mon: Monitored, subject: str) -> list[dict[str, Any]]:
    return await lifecycle_events(mon.edge.js, subject)


async def test_rules_and_alarms_from_the_cli(mon: Monitored, tmp_path: Path) -> None:
    env = {"EDGELOOP_MONITOR_API": str(mon.monitor.base_url), "EDGELOOP_API_TOKEN": TOKEN}

    def cli(*args: str) -> Result:
        return CliRunner().invoke(app, list(args), env=env)

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "drift_psi: 0.3\nerror_rate: 0.01\n"
        "kpis:\n  setosa_share:\n    predictions: [0]\n    max: 0.5\n"
    )
    args = ("monitor", "rules", "set", mon.model, "--file", str(rules))
    result = await asyncio.to_thread(cli, *args)
    assert result.exit_code == 0, result.output
    shown = await asyncio.to_thread(cli, "monitor", "rules", "show", mon.model)
    assert "drift_psi: 0.3" in shown.output
    assert "latency_p95_ms: 250.0" in shown.output  # a default shows through
    assert "setosa_share" in shown.output
    rules.write_text("drift_pis: 0.3\n")
    bad = await asyncio.to_thread(cli, *args)
    assert bad.exit_code == 1
    assert "unknown rule 'drift_pis'" in bad.output
    listed = await asyncio.to_thread(cli, "alarms", "list", "--open")
    assert listed.exit_code == 0, listed.output
    assert "no alarms" in listed.output
    trail = (await mon.registry.get("/api/v1/audit", params={"model": mon.model})).json()
    (changed,) = [r for r in trail["records"] if r["action"] == "monitor.rules"]
    assert changed["before"] == {}
    assert changed["after"]["drift_psi"] == 0.3


async def test_replicas_split_the_telemetry_partitions_and_count_every_record_once(
    mon: Monitored, tmp_path: Path
) -> None:
    """A second monitor replica (its own process) takes half of the telemetry partitions;
    SIGKILLed mid-stream, its partitions move back once their leases run out, and every
    batch lands in the windows exactly once."""
    batch = await registered_batches(mon)
    everything = set(range(s.TELEMETRY_PARTITIONS))

    def owned() -> set[int]:
        return {k for c in mon.service.partitioned for k in c.owned}

    async def holds(expected: int) -> bool:
        return len(owned()) == expected

    await eventually(lambda: holds(len(everything)), within=15, what="one replica, all partitions")
    settings = mon.settings
    other = ServiceProcess(
        "monitor-2",
        "edgeloop.monitor",
        free_port(),
        {
            "EDGELOOP_NATS_URL": settings.nats_url,
            "EDGELOOP_DATABASE_URL": settings.database_url,
            "EDGELOOP_OCI_REGISTRY_URL": settings.oci_registry_url,
            "EDGELOOP_MONITOR_API_TOKENS": TOKEN,
            "EDGELOOP_MONITOR_API_PORT": str(free_port()),
            "EDGELOOP_MONITOR_REGISTRY_API": settings.registry_api,
            "EDGELOOP_MONITOR_REGISTRY_TOKEN": TOKEN,
            "EDGELOOP_MONITOR_WINDOW_SECONDS": "2",
            "EDGELOOP_MONITOR_GRACE_SECONDS": "0.5",
            "EDGELOOP_MONITOR_PARTITION_LEASE_SECONDS": "1.5",
            "EDGELOOP_MONITOR_INSTANCE_ID": "replica-2",
        },
        tmp_path / "monitor-2.log",
    )
    other.http_port = free_port()
    other.env["EDGELOOP_MONITOR_HTTP_PORT"] = str(other.http_port)
    other.start()
    try:
        half = len(everything) // 2
        await eventually(lambda: holds(half), within=30, what="the partitions split in two")

        async def split() -> bool:
            rows = await _query(
                mon,
                "SELECT partition FROM monitor.partition_leases WHERE consumer = $1 "
                "AND owner = 'replica-2' AND lease_until > now()",
                s.CONSUMER_MONITOR_TELEMETRY,
            )
            theirs = {r["partition"] for r in rows}
            return len(theirs) == half and theirs == everything - owned()

        await eventually(split, within=30, what="the other half held by replica-2")
        for i in range(150):
            await publish_event(mon.edge.js, (b := batch(i)), subject=b.bus_subject())
        await asyncio.sleep(0.3)
        other.kill()  # SIGKILL mid-stream: its leases are not released
    finally:
        other.kill()
    for i in range(150, 300):
        await publish_event(mon.edge.js, (b := batch(i)), subject=b.bus_subject())
    await eventually(
        lambda: holds(len(everything)), within=30, what="the dead replica's partitions taken over"
    )

    async def all_counted() -> int | None:
        total = await _counted(mon)
        return total if total >= 300 * 50 else None

    try:
        await eventually(all_counted, within=60, what="every batch counted")
    except AssertionError:
        print((await mon.monitor.get("/v1/rejections")).json())
        print((await mon.monitor.get("/v1/windows", params={"model": mon.model})).json())
        raise
    await asyncio.sleep(1)  # nothing arrives twice later
    assert await _counted(mon) == 300 * 50
    # the twenty devices' batches went to several partitions, each to one durable
    consumers = await _query(
        mon,
        "SELECT DISTINCT consumer FROM monitor.inbox WHERE consumer LIKE $1",
        f"{s.CONSUMER_MONITOR_TELEMETRY}-%",
    )
    assert len(consumers) > 1


async def test_windows_and_alarms_are_per_device_group(mon: Monitored) -> None:
    await _deploy(
        mon,
        4,
        "feature=2,shift=3,after=0s,fraction=1.0",
        groups=["north", "north", "south", "south"],
    )

    async def raised() -> list[dict[str, Any]]:
        return [a for a in await mon.alarms(open="true") if a["rule"] == "drift_psi"]

    alarms = await eventually(raised, within=60, what="drift alarm")
    await asyncio.sleep(4)  # two more windows: the other group stays quiet
    alarms = await raised()
    assert [a["grp"] for a in alarms] == ["north"]
    events = await _lifecycle(mon, "alarm.raised")
    assert {e["group"] for e in events if e["rule"] == "drift_psi"} == {"north"}
    windows = (await mon.monitor.get("/v1/windows", params={"model": mon.model})).json()
    assert {w["group"] for w in windows["windows"]} == {"north", "south"}
    south = [w for w in windows["windows"] if w["group"] == "south" and w["evaluated"]]
    assert south
    assert all(
        max(f["psi"] for f in w["scores"]["features"].values()) < 0.25
        for w in south
        if w["scores"].get("features")
    )


async def test_drift_raises_its_alarm_before_the_window_closes(mon: Monitored) -> None:
    """Open windows are looked at as they grow: a drifted window raises its alarm (once)
    long before it closes; resolving still waits for closed windows."""
    m = classifier("iris")
    profile = await register_version(mon.registry, mon.model, "1", m.onnx, m.reference)
    assert profile is not None
    later = datetime.now(UTC) + timedelta(hours=1)  # a window that closes in an hour
    edges = [f["edges"] for f in profile["features"]]
    drifted = TelemetryBatch(
        model=mon.model,
        version="1",
        device_id="early-1",
        window_start=later,
        window_end=later,
        count=500,
        feature_names=[f["name"] for f in profile["features"]],
        feature_histograms=[Histogram(edges=e, counts=[0] * len(e) + [500]) for e in edges],
    )
    # an alarm needs evidence from two devices (min_devices)
    other = TelemetryBatch(
        **{**drifted.model_dump(), "event_id": uuid.uuid4(), "device_id": "early-2"}
    )
    for batch in (drifted, other):
        await publish_event(mon.edge.js, batch, subject=batch.bus_subject())

    async def raised() -> list[dict[str, Any]] | None:
        return await mon.alarms() or None

    alarms = await eventually(raised, within=30, what="an alarm from the open window")
    assert datetime.fromisoformat(alarms[0]["window_end"]) > datetime.now(UTC)
    assert alarms[0]["state"] == "raised"
    again = TelemetryBatch(**{**drifted.model_dump(), "event_id": uuid.uuid4()})
    await publish_event(mon.edge.js, again, subject=again.bus_subject())
    await eventually(lambda: _counted(mon, more_than=1000), within=30, what="the window grew")
    await asyncio.sleep(1)  # looked at again: still one alarm per rule
    rules = [a["rule"] for a in await mon.alarms()]
    assert len(rules) == len(set(rules))
    requests = await _lifecycle(mon, s.RETRAIN_REQUESTED)
    assert len([r for r in requests if r["model"] == mon.model]) == len(rules)


async def test_a_window_that_cannot_be_judged_is_skipped_not_retried_forever(
    mon: Monitored,
) -> None:
    """A stored window whose judging fails for good (here: a damaged aggregate) is marked
    judged with the error; the windows after it are judged (it would otherwise stay the
    oldest unjudged window and hold every later one back)."""
    m = classifier("iris")
    await register_version(mon.registry, mon.model, "1", m.onnx, m.reference)
    old = datetime.now(UTC) - timedelta(minutes=5)
    conn = await asyncpg.connect(mon.settings.database_url)
    try:
        await conn.execute(
            """INSERT INTO monitor.windows (model, version, grp, window_start, window_end,
                   aggregate, count) VALUES ($1, '1', '', $2, $3, '{"damaged": true}', 1)""",
            mon.model,
            old,
            old + timedelta(seconds=2),
        )
    finally:
        await conn.close()
    await _deploy(mon, 1, None)

    async def judged() -> list[dict[str, Any]] | None:
        rows = (await mon.monitor.get("/v1/windows", params={"model": mon.model})).json()
        done = [w for w in rows["windows"] if w["evaluated"]]
        return done if len(done) >= 2 else None

    done = await eventually(judged, within=30, what="the damaged window and a later one judged")
    damaged = [w for w in done if (w.get("scores") or {}).get("error")]
    assert len(damaged) == 1
    assert "KeyError" in damaged[0]["scores"]["error"]
    assert any("features" in (w.get("scores") or {}) for w in done)
