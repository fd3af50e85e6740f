"""Gateway and agents for real: mTLS gRPC, NATS (JetStream KV and streams), PostgreSQL,
the OCI registry, onnxruntime — from desired state to a running model and telemetry."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgeloop.contracts import subjects as s
from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.signing import fingerprint, load_public_key, rotation_payload
from edgeloop.devstack.servers import NatsServer, Postgres
from edgeloop.devstack.testing import eventually, stream_messages
from edgeloop.edge.agent import Faults
from edgeloop.gateway.pki import CertificateAuthority
from edgeloop.kit.bus import declare_topology
from edgeloop.kit.oci.signing import generate_keypair
from tests.edge_harness import PRIVATE, PUBLIC, EdgeStack, edge_stack, wait_state
from tests.modelzoo import classifier, failing_model

pytestmark = pytest.mark.timeout(180)

RUNNING = pb.DEVICE_STATE_RUNNING
FAILED = pb.DEVICE_STATE_FAILED


def _profile() -> dict[str, object]:
    from edgeloop.edge.runtime import OnnxModel
    from edgeloop.registry.profile import compute_profile

    m = classifier("iris")
    ref = np.load(__import__("io").BytesIO(m.reference))
    return compute_profile(OnnxModel(m.onnx), ref["X"], [str(n) for n in ref["feature_names"]])


async def test_desired_image_is_delivered_activated_and_streams_telemetry(
    edge: EdgeStack, unique: str
) -> None:
    device = f"dev-{unique}"
    agent = await edge.start_agent(await edge.enroll(device, {"site": "berlin"}))
    await eventually(lambda: _online(edge, device), what="device online")
    image = await edge.publish_image(
        f"iris{unique}", "1", classifier("iris").onnx, profile=_profile()
    )
    revision = await edge.set_desired(device, image.desired())

    await wait_state(agent, RUNNING, version="1")
    reported = await eventually(lambda: _reported_running(edge, device, image.digest))
    assert reported["desired_revision"] == revision
    assert reported["labels"] == {"site": "berlin"}

    # the device registry follows the session and the report
    body = (await edge.api.get(f"/v1/devices/{device}")).json()
    assert body["online"] is True
    assert body["labels"]["site"] == "berlin"
    assert body["version"] == "1"
    assert body["state"] == "running"

    # inferences → one telemetry batch on the bus, acknowledged
    for _ in range(5):
        agent.infer_once()
    agent.flush_telemetry()
    subject = s.stored_telemetry(image.model, device)
    msgs = await eventually(
        lambda: stream_messages(edge.js, s.STREAM_TELEMETRY, subject), what="telemetry on the bus"
    )
    batch = json.loads(msgs[0].data)
    assert batch["count"] == 5 * agent.config.infer_batch
    assert batch["digest"] == image.digest
    assert batch["feature_names"][0] == "sepal length (cm)"
    # the agent histograms into the reference profile's bins
    assert batch["feature_histograms"][0]["edges"] == _profile()["features"][0]["edges"]
    assert sum(batch["prediction_counts"].values()) == batch["count"]
    await eventually(lambda: _acked(agent), what="batch acknowledged")


async def test_interrupted_download_resumes_from_its_offset(edge: EdgeStack, unique: str) -> None:
    device = f"dev-{unique}"
    faults = Faults(cut_download_after=1 << 20)
    agent = await edge.start_agent(await edge.enroll(device), faults=faults)
    image = await edge.publish_image(f"big{unique}", "1", classifier("iris").onnx, filler=3 << 20)
    await edge.set_desired(device, image.desired())
    await wait_state(agent, RUNNING, version="1", within=60)
    assert faults.cut_download_after is None, "the link was never cut"
    manifest = await edge.api.get("/docs")  # any call: the gateway still serves
    assert manifest.status_code == 200
    # every byte crossed the link once: the second request started at the cut's offset
    manifest_size = len(agent.store.blob(image.digest).read_bytes())
    assert agent.bytes_downloaded == manifest_size + image.layer_size


async def test_tampered_blob_is_refused_and_the_good_model_keeps_running(
    edge: EdgeStack, unique: str
) -> None:
    device = f"dev-{unique}"
    agent = await edge.start_agent(await edge.enroll(device))
    good = await edge.publish_image(f"m{unique}", "1", classifier("iris").onnx)
    await edge.set_desired(device, good.desired())
    await wait_state(agent, RUNNING, version="1")

    bad = await edge.publish_image(f"m{unique}", "2", classifier("iris", c=0.5).onnx)
    # tamper with the layer in the gateway's cache: the gateway now serves altered bytes
    async with __import__("edgeloop.kit.oci", fromlist=["OciClient"]).OciClient(
        edge.registry_url
    ) as oci:
        raw, _, _ = await oci.get_manifest(bad.image.split("/", 1)[1], bad.digest)
    layer = json.loads(raw)["layers"][-1]["digest"]
    cached = edge.settings.cache_dir / layer.replace(":", "-")
    cached.write_bytes(b"\x1f\x8b tampered" * 100)
    await edge.set_desired(device, bad.desired())
    await wait_state(agent, FAILED, within=60)
    assert "corrupt" in agent.error
    assert agent.running is not None
    assert agent.running.installed.version == "1"


async def test_unsigned_or_foreign_signed_image_is_refused(edge: EdgeStack, unique: str) -> None:
    device = f"dev-{unique}"
    agent = await edge.start_agent(await edge.enroll(device))
    unsigned = await edge.publish_image(f"u{unique}", "1", classifier("iris").onnx, sign=False)
    await edge.set_desired(device, unsigned.desired())
    await wait_state(agent, FAILED)
    assert "not signed" in agent.error
    assert agent.running is None

    other_key, _ = generate_keypair()
    foreign = await edge.publish_image(f"u{unique}", "2", classifier("iris").onnx, key=other_key)
    await edge.set_desired(device, foreign.desired())
    await eventually(lambda: _error_has(agent, "signature check failed"))
    assert agent.running is None
    assert agent.bytes_downloaded == 0, "nothing is downloaded before the signature verifies"


async def test_signed_claims_decide_not_the_version_the_desired_state_names(
    edge: EdgeStack, unique: str
) -> None:
    device = f"dev-{unique}"
    agent = await edge.start_agent(await edge.enroll(device))
    v3 = await edge.publish_image(f"c{unique}", "3", classifier("iris").onnx)
    # the image's signature claims c…@3; the desired state (the gateway's word) says 9
    await edge.set_desired(device, dataclasses.replace(v3, version="9").desired())
    await wait_state(agent, FAILED)
    assert f"the image's signed claims say c{unique}@3 (release 1)" in agent.error
    assert f"the desired state names c{unique}@9" in agent.error
    assert agent.running is None
    assert agent.bytes_downloaded == 0, "refused before anything is downloaded"

    await edge.set_desired(device, v3.desired())
    await wait_state(agent, RUNNING, version="3")
    assert agent.running is not None
    assert agent.running.installed.release == 1


async def test_older_signed_release_is_refused_unless_an_explicit_rollback_to_one_run_here(
    edge: EdgeStack, unique: str
) -> None:
    # versions named by source commit: their names do not order, the signed release does
    model = f"r{unique}"
    first = await edge.publish_image(model, "c0ffee", classifier("iris").onnx)  # release 1
    second = await edge.publish_image(model, "abc123", classifier("iris", c=0.5).onnx)  # 2
    device = f"dev-{unique}"
    agent = await edge.start_agent(await edge.enroll(device))
    await edge.set_desired(device, second.desired())
    await wait_state(agent, RUNNING, version="abc123")

    # a genuine, signed, older release without an explicit rollback
    await edge.set_desired(device, first.desired())
    await wait_state(agent, FAILED)
    assert "(release 1): older than release 2 already run here (anti-rollback)" in agent.error
    assert agent.running is not None
    assert agent.running.installed.version == "abc123"

    # an explicit rollback, but to a release this device never ran
    await edge.set_desired(device, first.desired(explicit_rollback=True))
    await eventually(lambda: _error_has(agent, "this device never ran that release"))
    assert agent.running.installed.version == "abc123"

    # the platform's rollback: back to a release the device ran, and forward again
    other = f"dev2-{unique}"
    agent2 = await edge.start_agent(await edge.enroll(other))
    await edge.set_desired(other, first.desired())
    await wait_state(agent2, RUNNING, version="c0ffee")
    await edge.set_desired(other, second.desired())
    await wait_state(agent2, RUNNING, version="abc123")
    await edge.set_desired(other, first.desired(explicit_rollback=True))
    await wait_state(agent2, RUNNING, version="c0ffee")
    await edge.set_desired(other, second.desired())
    await wait_state(agent2, RUNNING, version="abc123")
    assert agent2.store.release_floor(model) == 2


async def test_key_rotation_signed_by_the_pinned_key_is_accepted_foreign_or_unsigned_refused(
    edge: EdgeStack, unique: str
) -> None:
    device = f"dev-{unique}"
    config = await edge.enroll(device)
    agent = await edge.start_agent(config)
    model = f"k{unique}"
    v1 = await edge.publish_image(model, "1", classifier("iris").onnx)
    await edge.set_desired(device, v1.desired())
    await wait_state(agent, RUNNING, version="1")
    pinned = fingerprint(load_public_key(PUBLIC))
    assert agent.trust.fingerprints == [pinned]

    new_private, new_public = generate_keypair()
    new = fingerprint(load_public_key(new_public))
    other_private, _ = generate_keypair()
    v2 = await edge.publish_image(model, "2", classifier("iris", c=0.5).onnx, key=new_private)
    # a rotation to the new key signed by a foreign key, and one not signed at all
    edge.publish_rotation(PRIVATE, new_public, 1, signer=other_private)
    unsigned = rotation_payload(pinned, load_public_key(new_public), 2)
    assert edge.settings.signing_key_rotations is not None
    (edge.settings.signing_key_rotations / "unsigned.json").write_text(
        json.dumps({"payload": base64.b64encode(unsigned).decode(), "signature": ""})
    )
    await edge.set_desired(device, v2.desired())
    await wait_state(agent, FAILED)
    assert f"key rotation refused: it is not signed by the pinned key {pinned}" in agent.error
    assert "key rotation refused: it is not signed" in agent.error
    assert agent.trust.fingerprints == [pinned]
    assert agent.running is not None
    assert agent.running.installed.version == "1"

    # a key offered later through the bundle is ignored: the device pinned its key
    await edge.stop_agent(agent)
    config.trusted_keys[0].write_bytes(new_public)
    config.trusted_key_fingerprints = [new]
    agent = await edge.start_agent(config)
    assert agent.trust.fingerprints == [pinned]
    await edge.set_desired(device, v2.desired())
    await wait_state(agent, FAILED)
    assert "signature check failed" in agent.error

    # the rotation signed by the pinned key is accepted, and persisted
    edge.publish_rotation(PRIVATE, new_public, 3)
    await edge.set_desired(device, v2.desired())
    await wait_state(agent, RUNNING, version="2")
    assert agent.trust.fingerprints == [new]
    assert agent.trust.version == 3
    pinned_file = json.loads((config.state_dir / "trust.json").read_text())
    assert [k["fingerprint"] for k in pinned_file["keys"]] == [new]

    # the replaced key signs nothing any more
    v3 = await edge.publish_image(model, "3", classifier("iris").onnx, key=PRIVATE)
    await edge.set_desired(device, v3.desired())
    await wait_state(agent, FAILED)
    assert "signature check failed" in agent.error
    assert agent.running.installed.version == "2"


async def test_model_failing_warmup_is_rolled_back_locally_and_reported(
    edge: EdgeStack, unique: str
) -> None:
    device = f"dev-{unique}"
    agent = await edge.start_agent(await edge.enroll(device))
    good = await edge.publish_image(f"w{unique}", "1", classifier("iris").onnx)
    await edge.set_desired(device, good.desired())
    await wait_state(agent, RUNNING, version="1")
    broken = await edge.publish_image(f"w{unique}", "2", failing_model())
    await edge.set_desired(device, broken.desired())
    await wait_state(agent, FAILED)
    assert "warm-up" in agent.error
    assert agent.running is not None
    assert agent.running.installed.version == "1"
    reported = await eventually(lambda: _reported_state(edge, device, "failed"))
    assert "warm-up" in reported["error"]
    assert reported["version"] == "1"  # what runs: the last known good
    assert reported["desired_digest"] == broken.digest
    # it keeps running: inferences still work
    agent.infer_once()
    assert agent.running.aggregator.count == agent.config.infer_batch


async def test_certificate_of_another_device_is_refused(edge: EdgeStack, unique: str) -> None:
    mine = await edge.enroll(f"a-{unique}")
    await edge.enroll(f"b-{unique}")
    mine.device_id = f"b-{unique}"  # claims b with a's certificate
    agent = await edge.start_agent(mine)
    await eventually(lambda: _refused(agent), what="session refused")
    assert agent.last_error is not None
    assert agent.last_error.code == "permission_denied"
    assert f"a-{unique}" in agent.last_error.message
    assert not agent.connected.is_set()


async def test_unenrolled_or_revoked_client_is_refused(edge: EdgeStack, unique: str) -> None:
    # a certificate from the platform's CA, but the device was never enrolled
    config = await edge.enroll(f"x-{unique}")
    ca = CertificateAuthority.load_or_create(edge.settings.pki_dir)
    stray = ca.issue_device(f"ghost-{unique}")
    config.cert.write_bytes(stray.cert_pem)
    config.key.write_bytes(stray.key_pem)
    config.device_id = f"ghost-{unique}"
    ghost = await edge.start_agent(config)
    await eventually(lambda: _refused(ghost))
    assert ghost.last_error is not None
    assert "not enrolled" in ghost.last_error.message

    # a certificate from another CA: the TLS handshake fails, no session at all
    other = CertificateAuthority.load_or_create(edge.root / "other-ca")
    foreign = other.issue_device(f"y-{unique}")
    creds = grpc.ssl_channel_credentials(
        root_certificates=CertificateAuthority.load_or_create(edge.settings.pki_dir).cert_pem,
        private_key=foreign.key_pem,
        certificate_chain=foreign.cert_pem,
    )
    async with grpc.aio.secure_channel(edge.address, creds) as channel:
        call = channel.stream_stream(
            "/edgeloop.edge.v1.EdgeGateway/Connect",
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.GatewayMessage.FromString,
        )()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _hello_and_read(call, f"y-{unique}")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    # a revoked device is refused at its next session
    revoked = await edge.enroll(f"r-{unique}")
    assert (await edge.api.post(f"/v1/devices/r-{unique}/revoke")).status_code == 200
    agent = await edge.start_agent(revoked)
    await eventually(lambda: _refused(agent))
    assert agent.last_error is not None
    assert "revoked" in agent.last_error.message


async def test_garbage_and_oversized_messages_cost_only_their_sender(
    edge: EdgeStack, unique: str
) -> None:
    bad_config = await edge.enroll(f"bad-{unique}")
    good = await edge.start_agent(await edge.enroll(f"good-{unique}"))
    image = await edge.publish_image(f"g{unique}", "1", classifier("iris").onnx)

    creds = grpc.ssl_channel_credentials(
        root_certificates=bad_config.ca_cert.read_bytes(),
        private_key=bad_config.key.read_bytes(),
        certificate_chain=bad_config.cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(edge.address, creds) as channel:
        call = channel.stream_stream(
            "/edgeloop.edge.v1.EdgeGateway/Connect",
            request_serializer=lambda b: b,
            response_deserializer=pb.GatewayMessage.FromString,
        )()
        hello = pb.AgentMessage(hello=pb.Hello(device_id=bad_config.device_id))
        await call.write(hello.SerializeToString())
        assert (await call.read()).WhichOneof("kind") == "welcome"
        await call.write(b"\xff\xfe garbage \x00\x01")
        err = await call.read()
        assert err.error.code == "invalid_message"
        assert not err.error.fatal
        await call.write(b"\x00" * (edge.settings.max_message_bytes + 1))
        err = await call.read()
        assert err.error.code == "too_large"
        # a telemetry batch that breaks the rules: refused by id, so the agent drops it
        bogus = pb.TelemetryBatch(batch_id="b1", model="m", feature_names=["a"])
        await call.write(pb.AgentMessage(telemetry=bogus).SerializeToString())
        err = await call.read()
        assert err.error.code == "invalid_message"
        assert err.error.batch_id == "b1"

        # meanwhile, the other device is served as usual
        await edge.set_desired(good.config.device_id, image.desired())
        await wait_state(good, RUNNING, version="1")
        # and the misbehaving session is still open
        await call.write(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=1)).SerializeToString())
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF


async def test_offline_batches_are_buffered_and_sent_on_reconnect(
    edge: EdgeStack, unique: str
) -> None:
    device = f"dev-{unique}"
    agent = await edge.start_agent(await edge.enroll(device))
    image = await edge.publish_image(f"o{unique}", "1", classifier("iris").onnx)
    await edge.set_desired(device, image.desired())
    await wait_state(agent, RUNNING, version="1")
    await eventually(lambda: _online(edge, device))

    agent.go_offline(3.0)
    await eventually(lambda: _disconnected(agent), what="agent offline")
    for _ in range(3):
        agent.infer_once()
        agent.flush_telemetry()
    assert len(agent.buffer) == 3
    await eventually(lambda: _acked(agent), within=30, what="buffer drained after reconnect")
    msgs = await stream_messages(
        edge.js, s.STREAM_TELEMETRY, s.stored_telemetry(image.model, device)
    )
    ids = [json.loads(m.data)["event_id"] for m in msgs]
    assert len(ids) == 3
    assert len(set(ids)) == 3
    # the gateway saw the session end and begin again
    status = await stream_messages(edge.js, s.STREAM_DEVICE, s.device_status_subject(device))
    states = [json.loads(m.data)["state"] for m in status]
    assert "offline" in states
    assert states[-1] == "running"


# --- helpers ------------------------------------------------------------------------------


async def _hello_and_read(call: grpc.aio.StreamStreamCall, device_id: str) -> object:
    await call.write(pb.AgentMessage(hello=pb.Hello(device_id=device_id)))
    return await call.read()


async def _online(edge: EdgeStack, device: str) -> bool:
    resp = await edge.api.get(f"/v1/devices/{device}")
    return resp.status_code == 200 and bool(resp.json()["online"])


async def _reported_running(edge: EdgeStack, device: str, digest: str) -> dict[str, object] | None:
    reported = await edge.reported(device)
    if reported and reported["state"] == "running" and reported["digest"] == digest:
        return reported
    return None


async def _reported_state(edge: EdgeStack, device: str, state: str) -> dict[str, object] | None:
    reported = await edge.reported(device)
    return reported if reported and reported["state"] == state else None


async def _acked(agent: object) -> bool:
    return len(agent.buffer) == 0  # type: ignore[attr-defined]


async def _refused(agent: object) -> bool:
    return agent.last_error is not None  # type: ignore[attr-defined]


async def _disconnected(agent: object) -> bool:
    return not agent.connected.is_set()  # type: ignore[attr-defined]


async def _error_has(agent: object, text: str) -> bool:
    return text in agent.error  # type: ignore[attr-defined]


_ = asyncio


async def test_a_bus_that_cannot_take_telemetry_costs_no_session_and_no_batch(
    nats_private: NatsServer, pg_dsn: str, registry_url: str, tmp_path: Path, unique: str
) -> None:
    """JetStream refuses (here: the stream is gone): the gateway answers 'unavailable'
    for that batch, the session goes on, the agent keeps the batch and sends it again
    until the bus takes it."""
    async with edge_stack(nats_private.url, pg_dsn, registry_url, tmp_path / "edge") as edge:
        device = f"dev-{unique}"
        agent = await edge.start_agent(await edge.enroll(device))
        image = await edge.publish_image(
            f"iris{unique}", "1", classifier("iris").onnx, profile=_profile()
        )
        await edge.set_desired(device, image.desired())
        await wait_state(agent, RUNNING, version="1")
        sessions = agent.sessions
        await edge.js.delete_stream(s.STREAM_TELEMETRY)
        agent.infer_once()
        agent.flush_telemetry()

        async def refused() -> bool:
            return agent.last_error is not None and agent.last_error.code == "unavailable"

        await eventually(refused, what="the batch refused as unavailable")
        await asyncio.sleep(1.5)  # it is sent again, refused again, kept
        assert agent.sessions == sessions  # the same session throughout
        assert len(agent.buffer) == 1
        await declare_topology(edge.js)  # the bus is back
        subject = s.stored_telemetry(image.model, device)
        msgs = await eventually(
            lambda: stream_messages(edge.js, s.STREAM_TELEMETRY, subject), what="telemetry"
        )
        assert len(msgs) == 1
        await eventually(lambda: _acked(agent), what="batch acknowledged")
        assert len(agent.buffer) == 0
        assert agent.sessions == sessions


async def test_a_bus_that_cannot_take_a_status_report_costs_no_session_and_no_activation(
    nats_private: NatsServer, pg_dsn: str, registry_url: str, tmp_path: Path, unique: str
) -> None:
    """JetStream refuses the device's status reports for a few seconds (here: the DEVICE
    stream is gone; in a cluster, its leader died): the gateway publishes the report
    again until the bus takes it; the session goes on, the download is not refused and
    the activation not failed."""
    async with edge_stack(nats_private.url, pg_dsn, registry_url, tmp_path / "edge") as edge:
        device = f"dev-{unique}"
        agent = await edge.start_agent(await edge.enroll(device))
        await eventually(lambda: _online(edge, device), what="device online")
        sessions = agent.sessions
        await edge.js.delete_stream(s.STREAM_DEVICE)
        image = await edge.publish_image(
            f"iris{unique}", "1", classifier("iris").onnx, profile=_profile()
        )
        await edge.set_desired(device, image.desired())
        await asyncio.sleep(4)  # it downloads and reports while the bus refuses
        await declare_topology(edge.js)  # the bus is back
        await wait_state(agent, RUNNING, version="1")
        assert agent.sessions == sessions, agent.last_error  # the same session throughout
        assert agent.activations == 1
        await eventually(lambda: _reported_running(edge, device, image.digest), what="reported")


async def test_a_second_agent_with_the_same_identity_is_refused_while_the_first_is_live(
    edge: EdgeStack, unique: str
) -> None:
    """Two agents with one device's bundle: the first keeps its session, the second is
    told why (ALREADY_EXISTS); once the first stops, the second gets the session."""
    device = f"twin-{unique}"
    config = await edge.enroll(device)
    first = await edge.start_agent(config)
    await eventually(lambda: _online(edge, device), what="device online")
    sessions = first.sessions
    second = await edge.start_agent(config)
    await eventually(lambda: _refused(second), what="the second agent refused")
    assert second.last_error is not None
    assert second.last_error.code == "already_connected"
    assert "already has a live session" in second.last_error.message
    await asyncio.sleep(1)
    assert first.connected.is_set()
    assert first.sessions == sessions  # never replaced
    assert not second.connected.is_set()
    await edge.stop_agent(first)
    await eventually(lambda: _connected(second), within=60, what="the second agent's session")


async def _connected(agent: object) -> bool:
    return bool(agent.connected.is_set())  # type: ignore[attr-defined]


async def test_a_device_connecting_while_the_database_is_down_is_told_to_come_back(
    nats_private: NatsServer,
    postgres_private: Postgres,
    registry_url: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """A Hello while the gateway's PostgreSQL was down ended the RPC with UNKNOWN (the
    certificate check's connection error out of the handler): an internal error to the
    device. It is told UNAVAILABLE, why, and that it is not final; its session opens once
    PostgreSQL is back."""
    dsn = await asyncio.to_thread(postgres_private.create_database, f"t_{unique}")
    async with edge_stack(nats_private.url, dsn, registry_url, tmp_path / "edge") as edge:
        device = f"dev-{unique}"
        config = await edge.enroll(device)
        await asyncio.to_thread(postgres_private.stop)
        try:
            agent = await edge.start_agent(config)

            async def told() -> bool:
                return agent.last_error is not None

            await eventually(told, within=60, what="the agent told why")
            assert agent.last_error is not None
            assert agent.last_error.code == "unavailable", agent.last_error
            assert "cannot reach its database" in agent.last_error.message
            assert not agent.last_error.fatal
            assert not agent.connected.is_set()
        finally:
            await asyncio.to_thread(postgres_private.start)
        await eventually(lambda: _connected(agent), within=90, what="a session once PG is back")


async def test_a_device_that_leaves_while_the_database_is_down_is_shown_offline_after(
    nats_private: NatsServer,
    postgres_private: Postgres,
    registry_url: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """A session ending while the gateway's PostgreSQL was down lost its one write (the
    error was swallowed): the device showed online until it connected again, for ever if
    it never did. The gateway records the disconnection again until PostgreSQL answers."""
    dsn = await asyncio.to_thread(postgres_private.create_database, f"t_{unique}")
    async with edge_stack(nats_private.url, dsn, registry_url, tmp_path / "edge") as edge:
        device = f"dev-{unique}"
        agent = await edge.start_agent(await edge.enroll(device))
        await eventually(lambda: _online(edge, device), within=60, what="device online")
        await asyncio.to_thread(postgres_private.stop)
        try:
            await edge.stop_agent(agent)
            await asyncio.sleep(2)  # its disconnection meets the outage
        finally:
            await asyncio.to_thread(postgres_private.start)

        async def offline() -> bool:
            resp = await edge.api.get(f"/v1/devices/{device}")
            return resp.status_code == 200 and resp.json()["online"] is False

        await eventually(offline, within=60, what="the device shown offline")
