"""The generated edge-protocol stubs: importable at the contracts path, current with the
.proto, every message round-trips, and the service works over a real gRPC channel."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.edge.v1 import edge_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "contracts/src/edgeloop/contracts/edge/v1"


def test_stubs_import_from_the_contracts_package() -> None:
    assert pb.__name__ == "edgeloop.contracts.edge.v1.edge_pb2"
    assert pb.DESCRIPTOR.package == "edgeloop.edge.v1"
    assert pb.AgentMessage.__module__ == pb.__name__  # pickles and reprs name the real path
    assert pb_grpc.edgeloop_dot_contracts_dot_edge_dot_v1_dot_edge__pb2 is pb  # type: ignore[attr-defined]
    for name in ("EdgeGatewayStub", "EdgeGatewayServicer", "add_EdgeGatewayServicer_to_server"):
        assert hasattr(pb_grpc, name), name


def test_edgeloop_stays_a_namespace_package() -> None:
    import edgeloop

    assert getattr(edgeloop, "__file__", None) is None, "never add edgeloop/__init__.py"


def test_service_shape() -> None:
    service = pb.DESCRIPTOR.services_by_name["EdgeGateway"]
    assert service.full_name == "edgeloop.edge.v1.EdgeGateway"
    connect = service.methods_by_name["Connect"]
    assert (connect.client_streaming, connect.server_streaming) == (True, True)
    assert connect.input_type is pb.AgentMessage.DESCRIPTOR
    assert connect.output_type is pb.GatewayMessage.DESCRIPTOR
    fetch = service.methods_by_name["FetchArtifact"]
    assert (fetch.client_streaming, fetch.server_streaming) == (False, True)
    assert fetch.output_type is pb.ArtifactChunk.DESCRIPTOR


def test_envelopes_offer_every_message() -> None:
    agent = {f.name for f in pb.AgentMessage.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert agent == {"hello", "heartbeat", "telemetry", "status", "command_result"}
    gateway = {f.name for f in pb.GatewayMessage.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert gateway == {"welcome", "desired", "command", "error", "ack"}
    states = set(pb.DeviceState.keys())
    assert {"DEVICE_STATE_IDLE", "DEVICE_STATE_DOWNLOADING", "DEVICE_STATE_ACTIVATING"} <= states
    assert {"DEVICE_STATE_RUNNING", "DEVICE_STATE_FAILED"} <= states


# --- every message, every field --------------------------------------------------------

_SCALARS: dict[int, object] = {
    FieldDescriptor.TYPE_DOUBLE: 0.25,
    FieldDescriptor.TYPE_FLOAT: 0.5,
    FieldDescriptor.TYPE_INT64: -(1 << 40),
    FieldDescriptor.TYPE_UINT64: (1 << 63) + 7,  # beyond int64: unsigned on the wire
    FieldDescriptor.TYPE_INT32: -7,
    FieldDescriptor.TYPE_UINT32: (1 << 32) - 1,
    FieldDescriptor.TYPE_BOOL: True,
    FieldDescriptor.TYPE_STRING: "ünïcode ✓",
    FieldDescriptor.TYPE_BYTES: b"\x00\xff\x10",
}


def _fill(msg: Message, depth: int = 0) -> Message:
    """Set every field of ``msg`` (one arm per oneof: the first) to a non-default value."""
    for field in msg.DESCRIPTOR.fields:
        if field.containing_oneof is not None and field.containing_oneof.fields[0] is not field:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            container = getattr(msg, field.name)
            if value_field.message_type is not None:
                _fill(container["k"], depth + 1)
            else:
                container["k"] = _scalar(value_field)
        elif field.message_type is not None:
            if depth > 4:
                continue
            if field.is_repeated:
                for _ in range(2):
                    _fill(getattr(msg, field.name).add(), depth + 1)
            else:
                _fill(getattr(msg, field.name), depth + 1)
        elif field.is_repeated:
            getattr(msg, field.name).extend([_scalar(field), _scalar(field)])
        else:
            setattr(msg, field.name, _scalar(field))
    return msg


def _scalar(field: Any) -> object:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    return _SCALARS[field.type]


def _messages() -> list[Descriptor]:
    return list(pb.DESCRIPTOR.message_types_by_name.values())


@pytest.mark.parametrize("descriptor", _messages(), ids=lambda d: d.name)
def test_every_message_round_trips_with_every_field(descriptor: Descriptor) -> None:
    cls: type[Message] = getattr(pb, descriptor.name)
    msg = _fill(cls())
    set_fields = {f.name for f, _ in msg.ListFields()}
    expected = {
        f.name
        for f in descriptor.fields
        if f.containing_oneof is None or f.containing_oneof.fields[0] is f
    }
    assert set_fields == expected, "the filler missed a field"
    back = cls.FromString(msg.SerializeToString())
    assert back == msg
    assert cls.FromString(b"") == cls(), "an empty message parses to the defaults"


@pytest.mark.parametrize(
    ("envelope", "arm"),
    [(pb.AgentMessage, f.name) for f in pb.AgentMessage.DESCRIPTOR.oneofs_by_name["kind"].fields]
    + [
        (pb.GatewayMessage, f.name)
        for f in pb.GatewayMessage.DESCRIPTOR.oneofs_by_name["kind"].fields
    ],
)
def test_every_envelope_arm_round_trips(envelope: type[Message], arm: str) -> None:
    msg = envelope()
    _fill(getattr(msg, arm))
    assert msg.WhichOneof("kind") == arm
    back = envelope.FromString(msg.SerializeToString())
    assert back.WhichOneof("kind") == arm
    assert back == msg


def test_unknown_fields_survive_a_relay() -> None:
    """A newer agent's fields pass through an older gateway's parse/serialise untouched."""
    newer = pb.Heartbeat(seq=3).SerializeToString() + b"\xf8\x07\x2a"  # field 127 = 42
    relayed = pb.Heartbeat.FromString(newer).SerializeToString()
    assert relayed == newer


# --- the stubs over a real channel -------------------------------------------------------

BLOB = bytes(range(256)) * 41  # 10 496 bytes
BLOB_DIGEST = "sha256:test"


class _Gateway(pb_grpc.EdgeGatewayServicer):
    """A toy gateway: welcomes, acks telemetry, serves one artifact from an offset."""

    async def Connect(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: object
    ) -> AsyncIterator[pb.GatewayMessage]:
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "hello":
                yield pb.GatewayMessage(
                    welcome=pb.Welcome(session_id="s1", device_id=msg.hello.device_id)
                )
                yield pb.GatewayMessage(desired=pb.DesiredState(model="iris", revision=1))
            elif kind == "telemetry":
                yield pb.GatewayMessage(ack=pb.Ack(batch_id=msg.telemetry.batch_id))

    async def FetchArtifact(
        self, request: pb.FetchArtifactRequest, context: object
    ) -> AsyncIterator[pb.ArtifactChunk]:
        size = request.max_chunk_bytes or 4096
        offset = request.offset
        while offset < len(BLOB):
            data = BLOB[offset : offset + size]
            yield pb.ArtifactChunk(
                digest=request.digest,
                offset=offset,
                data=data,
                total_size=len(BLOB),
                last=offset + len(data) >= len(BLOB),
            )
            offset += len(data)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    pb_grpc.add_EdgeGatewayServicer_to_server(_Gateway(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    await server.stop(None)


async def test_connect_streams_both_ways(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.EdgeGatewayStub(channel)

    async def agent() -> AsyncIterator[pb.AgentMessage]:
        yield pb.AgentMessage(hello=pb.Hello(device_id="dev-1", capabilities=["onnxruntime"]))
        yield pb.AgentMessage(telemetry=pb.TelemetryBatch(batch_id="b1", count=5))

    kinds = []
    async for reply in stub.Connect(agent()):
        kinds.append(reply.WhichOneof("kind"))
        if reply.HasField("welcome"):
            assert reply.welcome.device_id == "dev-1"
        if reply.HasField("ack"):
            assert reply.ack.batch_id == "b1"
    assert kinds == ["welcome", "desired", "ack"]


async def test_fetch_artifact_resumes_from_an_offset(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.EdgeGatewayStub(channel)
    got = bytearray()
    # the link drops after two chunks …
    call = stub.FetchArtifact(pb.FetchArtifactRequest(digest=BLOB_DIGEST, max_chunk_bytes=1000))
    async for chunk in call:
        assert chunk.offset == len(got)
        got += chunk.data
        if len(got) >= 2000:
            call.cancel()
            break
    # … and the download resumes where it stopped
    async for chunk in stub.FetchArtifact(
        pb.FetchArtifactRequest(digest=BLOB_DIGEST, offset=len(got), max_chunk_bytes=3000)
    ):
        assert chunk.offset == len(got)
        got += chunk.data
        last = chunk.last
    assert last
    assert bytes(got) == BLOB


# --- the committed stubs are what `make proto` generates ----------------------------------


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    pytest.importorskip("mypy_protobuf")
    env = {
        **os.environ,
        "PROTO_OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    subprocess.run(
        ["bash", str(ROOT / "scripts/gen_proto.sh")],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    fresh = tmp_path / "edgeloop/contracts/edge/v1"
    for name in ("edge_pb2.py", "edge_pb2.pyi", "edge_pb2_grpc.py", "edge_pb2_grpc.pyi"):
        assert (fresh / name).read_text() == (GENERATED / name).read_text(), (
            f"{name} is stale: run `make proto` and commit the result"
        )
