"""Devices are authenticated, not trusted (DESIGN §6a), against the real gateway, agents,
registry, deployer process, monitor, NATS and PostgreSQL: one forged device cannot fail a
canary, raise an alarm, ask for retraining or inject labels; a device's own word about its
labels does not target rollouts; a revoked device loses its session and its downloads."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import CONFIDENCE_EDGES, LATENCY_MS_EDGES
from edgeloop.devstack.servers import NatsServer, free_port
from edgeloop.devstack.testing import api_up, eventually
from edgeloop.edge.agent import AgentConfig, Faults
from tests.deploy_harness import DeployStack, deploy_stack, monitor_beside
from tests.edge_harness import TOKEN, EdgeStack, wait_state
from tests.modelzoo import classifier

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

HONEST = 20
DOWNLOADING = pb.DEVICE_STATE_DOWNLOADING


@dataclass
class Trusting:
    deploy: DeployStack
    monitor: httpx.AsyncClient


@pytest.fixture
async def stack(
    nats_private: NatsServer, private_dsn: str, registry_url: str, tmp_path: Path, unique: str
) -> AsyncIterator[Trusting]:
    """Registry, gateway (a per-device budget of 50 batches and 1000 inferences a second,
    at most 20,000 a batch), deployer process, monitor (2 s windows) and agents on private
    NATS and database."""
    gateway = {
        # an honest device here sends 2 batches of 80 inferences a second. The gateway
        # reads a session's batches one after the other, each once the bus has stored the
        # one before: when a loaded bus stalls, what the device sent meanwhile arrives at
        # once, so the budget leaves room for a stall of 50 s (the forged device is over
        # the budget of inferences by its volume, at any pace)
        "device_batches_per_second": 50,
        "device_records_per_second": 1000,
        "max_batch_count": 20_000,
    }
    async with deploy_stack(
        nats_private.url, private_dsn, registry_url, tmp_path, unique, gateway_settings=gateway
    ) as deploy:
        port = free_port()
        monitor = monitor_beside(deploy, nats_private.url, private_dsn, registry_url, port)
        async with (
            monitor.running(),
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=30,
            ) as api,
        ):
            await eventually(lambda: api_up(api), what="monitor API")
            yield Trusting(deploy, api)


def _channel(config: AgentConfig, address: str) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=config.ca_cert.read_bytes(),
        private_key=config.key.read_bytes(),
        certificate_chain=config.cert.read_bytes(),
    )
    # a fixed 64 KB receive window, as on a slow link: what the reader has not taken
    # stays at the gateway (with BDP probing the window grows to the whole download)
    return grpc.aio.secure_channel(address, creds, options=[("grpc.http2.bdp_probe", 0)])


@dataclass
class Forged:
    """An enrolled device whose software is hostile: a raw session that says it runs
    whatever it is asked to (so it stays in rollouts) and sends what it likes."""

    config: AgentConfig
    call: grpc.aio.StreamStreamCall
    errors: dict[str, str] = field(default_factory=dict)
    """batch id → error code the gateway answered."""
    acked: set[str] = field(default_factory=set)
    running: tuple[str, str] | None = None
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One write at a time on the stream (its reader answers desired states)."""

    async def beat(self, seconds: float) -> None:
        """Heartbeats, as any device that wants to keep its session sends them: the
        gateway ends a session silent for three intervals, and a slow machine can keep
        this one silent that long between two steps of the attack."""
        seq = 0
        while True:
            seq += 1
            beat = pb.Heartbeat(seq=seq)
            beat.sent_at.GetCurrentTime()
            async with self.writing:
                await self.call.write(pb.AgentMessage(heartbeat=beat))
            await asyncio.sleep(seconds)

    async def read(self) -> None:
        while (msg := await self.call.read()) != grpc.aio.EOF:
            kind = msg.WhichOneof("kind")
            if kind == "desired" and msg.desired.manifest_digest:
                d = msg.desired
                await self.report(d.model, d.version, d.manifest_digest, d.rollout_id, d.revision)
            elif kind == "error" and msg.error.batch_id:
                self.errors[msg.error.batch_id] = msg.error.code
            elif kind == "ack":
                self.acked.add(msg.ack.batch_id)

    async def report(
        self, model: str, version: str, digest: str, rollout_id: str = "", revision: int = 0
    ) -> None:
        """Says it runs ``model@version`` (whether or not that is true)."""
        self.running = (model, version)
        report = pb.StatusReport(
            state=pb.DEVICE_STATE_RUNNING,
            model=model,
            version=version,
            digest=digest,
            desired_digest=digest,
            rollout_id=rollout_id,
            desired_revision=revision,
        )
        async with self.writing:
            await self.call.write(pb.AgentMessage(status=report))

    async def send(self, batch: pb.TelemetryBatch) -> str:
        batch.batch_id = str(uuid.uuid4())
        async with self.writing:
            await self.call.write(pb.AgentMessage(telemetry=batch))
        return batch.batch_id


def _batch(
    model: str,
    version: str,
    profile: dict[str, Any],
    *,
    count: int = 2000,
    latency_bin: int = 0,
    feature_bin: int | None = None,
    prediction: str = "0",
    window_end: float | None = None,
) -> pb.TelemetryBatch:
    """A batch that keeps every rule at entry: counts agree, bins are the agents'."""
    end = time.time() if window_end is None else window_end
    batch = pb.TelemetryBatch(model=model, version=version, count=count)
    batch.window_start.FromNanoseconds(int((end - 0.5) * 1e9))
    batch.window_end.FromNanoseconds(int(end * 1e9))
    for f in profile["features"]:
        edges = [float(e) for e in f["edges"]]
        counts = [0] * (len(edges) + 1)
        counts[len(edges) if feature_bin is None else feature_bin] = count
        batch.feature_names.append(f["name"])
        batch.feature_histograms.add(edges=edges, counts=counts)
    batch.prediction_counts[prediction] = count
    latency = [0] * (len(LATENCY_MS_EDGES) + 1)
    latency[latency_bin] = count
    batch.latency_ms_histogram.CopyFrom(pb.Histogram(edges=LATENCY_MS_EDGES, counts=latency))
    confidence = [0] * (len(CONFIDENCE_EDGES) + 1)
    confidence[-1] = count
    batch.confidence_histogram.CopyFrom(pb.Histogram(edges=CONFIDENCE_EDGES, counts=confidence))
    return batch


async def test_one_forged_device_cannot_fail_a_canary_raise_an_alarm_or_label_data(
    stack: Trusting, unique: str
) -> None:
    deploy = stack.deploy
    sel = {"fleet": unique}
    model = f"iris{unique}"
    good = classifier("iris")
    honest = await deploy.devices(HONEST, sel, telemetry_seconds=0.5, infer_seconds=0.1)
    resp = await stack.monitor.put(
        # thresholds above what 2 s windows of the honest devices score by chance
        f"/v1/rules/{model}",
        json={"min_count": 300, "drift_psi": 0.5, "prediction_psi": 0.6},
    )
    assert resp.status_code == 200, resp.text

    forged_id = f"zz-forged-{unique}"
    config = await deploy.edge.enroll(forged_id, sel)
    async with _channel(config, deploy.edge.address) as channel:
        call = channel.stream_stream(
            "/edgeloop.edge.v1.EdgeGateway/Connect",
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.GatewayMessage.FromString,
        )()
        await call.write(pb.AgentMessage(hello=pb.Hello(device_id=forged_id)))
        welcome = await call.read()
        assert welcome.WhichOneof("kind") == "welcome"
        forged = Forged(config, call)
        tasks = [
            asyncio.create_task(forged.read()),
            asyncio.create_task(forged.beat(welcome.welcome.heartbeat_interval_seconds / 2)),
        ]
        try:
            await _attack(stack, forged, model, sel, honest, good)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task


async def _attack(
    stack: Trusting,
    forged: Forged,
    model: str,
    sel: dict[str, str],
    honest: list[str],
    good: Any,
) -> None:
    deploy = stack.deploy
    v1 = await deploy.validated(model, "1", good.onnx, good.reference)
    code, body = await deploy.start(model, "1", sel, waves=[{"percent": 100}], bake_seconds=0)
    assert code == 201, body
    await deploy.wait_rollout(body["rollout_id"], "completed", within=120)
    await deploy.running(honest, v1)
    profile = (
        await deploy.registry.get(f"/api/v1/models/{model}/versions/1", params={"profile": "true"})
    ).json()["profile"]

    v2 = await deploy.validated(model, "2", classifier("iris", seed=1).onnx, good.reference)
    code, body = await deploy.start(
        model, "2", sel, waves=[{"count": 5}, {"percent": 100}], bake_seconds=8
    )
    assert code == 201, body
    rid = body["rollout_id"]
    # the forged device says it runs the canary version too, whatever it was sent
    await forged.report(model, "2", v2.digest)

    # what the gateway refuses at entry, each counted for the device
    inconsistent = _batch(model, "1", profile)
    inconsistent.feature_histograms[0].counts[0] += 5  # counts more rows than inferences
    trillion = _batch(model, "1", profile, count=100)
    trillion.prediction_counts["0"] = 10**12
    labelled = _batch(model, "1", profile)
    labelled.samples.add(features=[5.0, 3.0, 1.5, 0.2], prediction="0", label="2")
    refused = [
        ("wrong_version", _batch(model, "9", profile)),
        ("clock_skew", _batch(model, "1", profile, window_end=time.time() + 3600)),
        ("too_large", _batch(model, "1", profile, count=10**9)),
        ("inconsistent", inconsistent),
        ("inconsistent", trillion),
        ("labelled_samples", labelled),
    ]
    sent = [(code, await forged.send(batch)) for code, batch in refused]

    # and what is plausible one batch at a time, but poison: the canary version at
    # 2 s per inference predicting one class, the baseline's inputs all drifted —
    # enough by itself to fail the canary, raise alarms and ask for retraining
    async def poison() -> None:
        while True:
            await forged.send(_batch(model, "2", profile, latency_bin=len(LATENCY_MS_EDGES)))
            await forged.send(_batch(model, "1", profile, prediction="2"))
            await asyncio.sleep(0.5)

    poisoner = asyncio.create_task(poison())
    try:
        # a burst over the device's budget: held back, counted. Each batch carries the
        # most inferences one may (20,000: 20 s of the budget of 1000/s, all it saves up),
        # so all but one in 20 s are held back however slowly a loaded gateway reads them
        # (a burst of small batches is over a budget of batches only if read faster)
        for _ in range(15):
            await forged.send(_batch(model, "1", profile, count=20_000, feature_bin=0))
        done = await deploy.wait_rollout(rid, "completed", "rolled_back", within=150)
        await asyncio.sleep(3)  # the windows of the last wave are judged too
    finally:
        poisoner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poisoner
    assert done["state"] == "completed", done["reason"]
    await deploy.running(honest, v2)

    # refused at entry, by kind, and counted for the device (not for the honest ones)
    await eventually(lambda: _answered(forged, [b for _, b in sent]), what="refusals")
    assert [forged.errors[batch] for _, batch in sent] == [code for code, _ in sent]

    async def counted() -> dict[str, Any] | None:
        body = (await deploy.edge.api.get(f"/v1/devices/{forged.config.device_id}")).json()
        return body if body["refusals"].get("over_budget") else None

    record = await eventually(counted, what="refusals counted for the device")
    refusals = record["refusals"]
    assert refusals["inconsistent"] == 2
    for code in ("wrong_version", "clock_skew", "too_large", "labelled_samples"):
        assert refusals[code] == 1, refusals
    assert refusals["over_budget"] >= 10
    for device in honest[:3]:
        assert (await deploy.edge.api.get(f"/v1/devices/{device}")).json()["refusals"] == {}

    # the verdicts: pass, the forged device trimmed and named; no fail, no alarm, no
    # retraining request
    verdicts = [v for v in await deploy.events("rollout.canary.verdict") if v["rollout_id"] == rid]
    assert "pass" in [v["verdict"] for v in verdicts]
    assert "fail" not in [v["verdict"] for v in verdicts]
    named = [v for v in verdicts if forged.config.device_id in v.get("trimmed_devices", {})]
    assert named, verdicts
    assert any(forged.config.device_id in r for v in named for r in v["reasons"])
    alarms = (await stack.monitor.get("/v1/alarms", params={"model": model})).json()["alarms"]
    assert alarms == [], alarms
    assert [r for r in await deploy.events("retrain.requested") if r["model"] == model] == []
    rejections = (
        await stack.monitor.get("/v1/rejections", params={"device_id": forged.config.device_id})
    ).json()["rejections"]
    assert "implausible" in {r["code"] for r in rejections}
    # nothing the devices sent is ground truth
    samples = (
        await stack.monitor.get("/v1/samples", params={"model": model, "kind": "labelled"})
    ).json()["samples"]
    assert samples == []


async def _answered(forged: Forged, batches: Any) -> bool:
    return all(b in forged.errors for b in batches)


# --- identity ---------------------------------------------------------------------------


async def test_hello_is_size_checked_and_its_labels_do_not_target(
    edge: EdgeStack, unique: str
) -> None:
    config = await edge.enroll(f"big-{unique}", {"fleet": unique})
    async with _channel(config, edge.address) as channel:
        call = channel.stream_stream(
            "/edgeloop.edge.v1.EdgeGateway/Connect",
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.GatewayMessage.FromString,
        )()
        labels = {f"k{i}": "v" * 1000 for i in range(1000)}  # 1 MB of labels
        await call.write(pb.AgentMessage(hello=pb.Hello(device_id=config.device_id, labels=labels)))
        answer = await call.read()
        assert answer.error.code == "too_large"
        assert answer.error.fatal
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # a device that says env=prod about itself (enrolment did not say env): kept as a
    # reported attribute, never used to select it
    device = f"claims-{unique}"
    claims = await edge.enroll(device, {"fleet": unique})
    claims.labels = {"env": "prod", "fleet": "other"}
    agent = await edge.start_agent(claims)
    await eventually(lambda: _online(edge, device), what="device online")
    body = (await edge.api.get(f"/v1/devices/{device}")).json()
    assert body["labels"] == {"fleet": unique}
    assert body["reported_labels"] == {"env": "prod", "fleet": "other"}
    listed = (await edge.api.get("/v1/devices", params={"selector": "env=prod"})).json()
    assert device not in [d["device_id"] for d in listed["devices"]]
    listed = (await edge.api.get("/v1/devices", params={"selector": f"fleet={unique}"})).json()
    assert device in [d["device_id"] for d in listed["devices"]]
    assert agent.connected.is_set()


async def test_a_revoked_device_loses_its_session_and_its_download_at_once(
    edge: EdgeStack, unique: str
) -> None:
    device = f"rev-{unique}"
    config = await edge.enroll(device, {"fleet": unique})
    agent = await edge.start_agent(
        config, faults=Faults(slow_link_bytes_per_s=256 * 1024)
    )  # a 4 MB model takes ~16 s to arrive
    image = await edge.publish_image(f"rv{unique}", "1", classifier("iris").onnx, filler=4 << 20)
    await edge.set_desired(device, image.desired())
    await wait_state(agent, DOWNLOADING)

    # a second download of the model layer, read as it arrives
    manifest = await _fetch_all(config, edge.address, image.digest, image.image)
    layer = _last_layer(manifest)
    async with _channel(config, edge.address) as channel:
        fetch = channel.unary_stream(
            "/edgeloop.edge.v1.EdgeGateway/FetchArtifact",
            request_serializer=pb.FetchArtifactRequest.SerializeToString,
            response_deserializer=pb.ArtifactChunk.FromString,
        )(pb.FetchArtifactRequest(digest=layer, image=image.image, max_chunk_bytes=16 * 1024))
        first = await fetch.read()
        assert first.data

        revoked_at = time.monotonic()
        assert (await edge.api.post(f"/v1/devices/{device}/revoke")).status_code == 200
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _read_slowly(fetch)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await eventually(lambda: _disconnected(agent), within=5, what="session ended")
        ended = time.monotonic() - revoked_at
        assert ended < 5

        # any later fetch is refused at once
        again = channel.unary_stream(
            "/edgeloop.edge.v1.EdgeGateway/FetchArtifact",
            request_serializer=pb.FetchArtifactRequest.SerializeToString,
            response_deserializer=pb.ArtifactChunk.FromString,
        )(pb.FetchArtifactRequest(digest=layer, image=image.image))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await again.read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await asyncio.sleep(1)
    assert not agent.connected.is_set(), "the revoked device got a new session"
    assert agent.running is None

    # enrolment and revocation are in the audit trail
    conn = await asyncpg.connect(edge.settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT action, actor FROM audit.records WHERE subject = $1 ORDER BY seq",
            f"device {device}",
        )
    finally:
        await conn.close()
    assert [r["action"] for r in rows] == ["device.enroll", "device.revoke"]
    assert all(r["actor"] for r in rows)


async def _read_slowly(fetch: Any) -> None:
    """Read a download as a slow link would (raises when the gateway ends it)."""
    while (chunk := await fetch.read()) != grpc.aio.EOF:
        assert not chunk.last, "the whole layer arrived after the revocation"
        await asyncio.sleep(0.05)


async def _fetch_all(config: AgentConfig, address: str, digest: str, image: str) -> bytes:
    async with _channel(config, address) as channel:
        call = channel.unary_stream(
            "/edgeloop.edge.v1.EdgeGateway/FetchArtifact",
            request_serializer=pb.FetchArtifactRequest.SerializeToString,
            response_deserializer=pb.ArtifactChunk.FromString,
        )(pb.FetchArtifactRequest(digest=digest, image=image))
        return b"".join([c.data async for c in call])


def _last_layer(manifest: bytes) -> str:
    import json

    return str(json.loads(manifest)["layers"][-1]["digest"])


async def _online(edge: EdgeStack, device: str) -> bool:
    resp = await edge.api.get(f"/v1/devices/{device}")
    return resp.status_code == 200 and bool(resp.json()["online"])


async def _disconnected(agent: Any) -> bool:
    return not agent.connected.is_set()
