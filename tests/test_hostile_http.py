"""Hostile HTTP clients against the real registry, deployer, monitor and gateway, each its
own process (so its memory is measured alone): unauthenticated and oversized bodies are
refused before they are read (401/413, peak RSS growth under 50 MB, the service still
answers), bombs in uploads are refused 422 by the worker that checks them while the
registry keeps answering, names are checked against their rule, thresholds against the
platform's minimums."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from edgeloop.cli.main import app as cli
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import eventually
from edgeloop.devstack.up import ServiceProcess
from edgeloop.kit.api import LINGER_BYTES
from tests.modelzoo import classifier
from tests.watch import PeakRss

pytestmark = pytest.mark.slow

TOKEN = "hostile-http-test-token-5c1e"
MiB = 1 << 20
#: What a probe sends at most when nothing stops it (the services' limits are 1-25 MiB).
PROBE_BYTES = 200 * MiB


def most_sent_before_refused() -> int:
    """The most a client can hand its socket before a refusal stops it: what the server
    still reads after answering (``LINGER_BYTES``, then it closes), plus what loopback
    TCP holds in flight — the receiver's and the sender's buffers at their autotuning
    maximum. A client that noticed the answer late (a loaded machine) sends up to that;
    a server that reads the body sends it all (``PROBE_BYTES``)."""
    buffers = sum(
        int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        for name in ("tcp_rmem", "tcp_wmem")
    )
    return LINGER_BYTES + buffers


#: The peak RSS a service may gain while it is probed.
RSS_BUDGET = 50 * MiB


@dataclass
class Api:
    """One service process and where its API is."""

    service: ServiceProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = TOKEN, timeout: float = 30) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)


@pytest.fixture(scope="module")
def apis(
    nats_url: str, pg_dsn: str, registry_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Api]]:
    """The four services with an HTTP API, each ``python -m edgeloop.<name>``."""
    root = tmp_path_factory.mktemp("hostile")
    ports = {name: free_port() for name in ("registry", "deployer", "monitor", "gateway")}
    registry_api = f"http://127.0.0.1:{ports['registry']}"
    own = {
        "registry": {
            "MAX_MODEL_BYTES": str(8 * MiB),
            "MAX_DATA_BYTES": str(8 * MiB),
            "MAX_UNPACKED_BYTES": str(64 * MiB),
            "CHECK_CPU_SECONDS": "3",
            "CHECK_MEMORY_BYTES": str(1 << 30),
            "CHECK_TIMEOUT_SECONDS": "30",
            "MIN_THRESHOLDS": json.dumps({"accuracy": 0.8}),
            "REPOSITORY_PREFIX": f"h{uuid.uuid4().hex[:8]}/models",
        },
        "deployer": {
            "REGISTRY_API": registry_api,
            "REGISTRY_TOKEN": TOKEN,
            "GATEWAY_API": f"http://127.0.0.1:{ports['gateway']}",
            "GATEWAY_TOKEN": TOKEN,
            "INSTANCE_ID": f"hostile-{uuid.uuid4().hex[:8]}",
        },
        "monitor": {"REGISTRY_API": registry_api, "REGISTRY_TOKEN": TOKEN},
        "gateway": {
            "GRPC_PORT": str(free_port()),
            "PKI_DIR": str(root / "pki"),
            "CACHE_DIR": str(root / "blobs"),
        },
    }
    apis: dict[str, Api] = {}
    for name, port in ports.items():
        prefix = f"EDGELOOP_{name.upper()}_"
        health = free_port()
        env = {
            f"{prefix}HTTP_PORT": str(health),
            "EDGELOOP_NATS_URL": nats_url,
            "EDGELOOP_DATABASE_URL": pg_dsn,
            "EDGELOOP_OCI_REGISTRY_URL": registry_url,
            f"{prefix}API_TOKENS": TOKEN,
            f"{prefix}API_PORT": str(port),
            **{prefix + k: v for k, v in own[name].items()},
        }
        proc = ServiceProcess(name, f"edgeloop.{name}", health, env, root / f"{name}.log")
        proc.start()
        apis[name] = Api(proc, port)
    try:
        asyncio.run(_all_up(apis))
        yield apis
    finally:
        for api in apis.values():
            api.service.terminate()
        for api in apis.values():
            with contextlib.suppress(Exception):
                api.service.proc.wait(20)  # type: ignore[union-attr]
            api.service.kill()


async def _all_up(apis: dict[str, Api]) -> None:
    for api in apis.values():
        await eventually(lambda a=api: _answers(a), within=90, what=f"{api.service.name} API")


async def _answers(api: Api) -> bool:
    try:
        async with api.client(timeout=5) as client:
            # a GET every service has: OpenAPI's document (public)
            return (await client.get("/openapi.json")).status_code == 200
    except httpx.TransportError:
        return False


# --- probes ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a probe saw: the status and detail (0: the connection closed without an
    answer), the bytes it got to send, and the service's peak RSS growth."""

    status: int
    detail: str
    sent: int
    rss_growth: int


async def probe(
    api: Api,
    method: str,
    path: str,
    *,
    token: str | None,
    content_length: int | None = None,
    content_type: str = "application/json",
    prefix: bytes = b"",
    total: int = PROBE_BYTES,
) -> Outcome:
    """Send up to ``total`` bytes of body (chunked, or under ``content_length``, which
    may lie about the size) while reading the answer; stop sending once it came."""
    with PeakRss(api.service.pid or 0) as rss:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{api.port}"]
        head.append(f"Content-Type: {content_type}")
        if token:
            head.append(f"Authorization: Bearer {token}")
        head.append(
            f"Content-Length: {content_length}"
            if content_length is not None
            else "Transfer-Encoding: chunked"
        )
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        answer = asyncio.create_task(_read_answer(reader))
        chunk = b" " * MiB
        sent = 0
        with contextlib.suppress(ConnectionError):
            if prefix:
                writer.write(
                    prefix
                    if content_length is not None
                    else b"%x\r\n%s\r\n" % (len(prefix), prefix)
                )
            while sent < total and not answer.done():
                writer.write(
                    chunk if content_length is not None else b"100000\r\n" + chunk + b"\r\n"
                )
                await writer.drain()
                sent += len(chunk)
            if content_length is None and not answer.done():
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        try:
            status, detail = await asyncio.wait_for(answer, 60)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return Outcome(status, detail, sent, rss.growth)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, str]:
    try:
        line = await reader.readline()
        if not line:
            return 0, "connection closed"
        status = int(line.split()[1])
        length = 0
        while (header := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length)
    except ConnectionError as exc:
        return 0, f"connection closed: {exc}"
    try:
        return status, str(json.loads(body)["detail"])
    except (ValueError, KeyError, TypeError):
        return status, body.decode(errors="replace")


#: A route that reads, per service.
GET_ROUTES = {
    "registry": "/api/v1/models",
    "deployer": "/v1/rollouts",
    "monitor": "/v1/alarms",
    "gateway": "/v1/devices",
}
#: A route that takes a JSON body, per service.
JSON_ROUTES = {
    "registry": ("POST", "/api/v1/tokens"),
    "deployer": ("POST", "/v1/rollouts"),
    "monitor": ("PUT", "/v1/rules/m"),
    "gateway": ("POST", "/v1/devices/x/enroll"),
}


async def _healthy(api: Api) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(api.service.health_url)).status_code == 200
    async with api.client(timeout=10) as client:
        resp = await client.get(GET_ROUTES[api.service.name])
        assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("name", sorted(JSON_ROUTES))
async def test_unauthenticated_and_oversized_bodies_are_refused_before_they_are_read(
    apis: dict[str, Api], name: str
) -> None:
    api = apis[name]
    method, path = JSON_ROUTES[name]
    probes = {
        "no token, chunked": await probe(api, method, path, token=None),
        "no token, 1.5 GB Content-Length": await probe(
            api, method, path, token=None, content_length=1500 * 1000 * MiB
        ),
        "bad token, chunked": await probe(api, method, path, token="not-a-token"),
        "token, chunked over the limit": await probe(api, method, path, token=TOKEN),
        "token, Content-Length over the limit": await probe(
            api, method, path, token=TOKEN, content_length=1500 * 1000 * MiB
        ),
    }
    for what, outcome in probes.items():
        print(f"{name:9} {what:38} → {outcome}")
    for what, outcome in probes.items():
        expected = 413 if what.startswith("token") else 401
        assert outcome.status == expected, (what, outcome)
        assert outcome.rss_growth < RSS_BUDGET, (what, outcome)
        assert outcome.sent <= most_sent_before_refused(), (what, outcome)  # not read
    assert "Bearer" in probes["no token, chunked"].detail
    assert "invalid API token" in probes["bad token, chunked"].detail
    assert f"{MiB} bytes" in probes["token, chunked over the limit"].detail
    assert f"{MiB} bytes" in probes["token, Content-Length over the limit"].detail
    await _healthy(api)


async def test_an_upload_is_limited_by_the_registrys_file_limits(apis: dict[str, Api]) -> None:
    """The upload route takes more than a JSON route (its files), but not without a token
    and not beyond the files' limits."""
    api = apis["registry"]
    path = "/api/v1/models/big/versions"
    multipart = "multipart/form-data; boundary=x"
    part = (
        b'--x\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    anonymous = await probe(api, "POST", path, token=None, content_type=multipart, prefix=part)
    assert anonymous.status == 401, anonymous
    oversized = await probe(api, "POST", path, token=TOKEN, content_type=multipart, prefix=part)
    assert oversized.status == 413, oversized
    assert str(8 * MiB + 2 * 8 * MiB + MiB) in oversized.detail, oversized
    for outcome in (anonymous, oversized):
        assert outcome.rss_growth < RSS_BUDGET, outcome
        assert outcome.sent <= 40 * MiB, outcome
    await _healthy(api)


# --- bombs ---------------------------------------------------------------------------------


def deflate_bomb_npz(rows: int, features: int = 4) -> bytes:
    """An ``.npz`` whose ``X`` (rows x features of float64 zeros) is about a thousand
    times its compressed size: one compressed block of zeros repeated (each block ends
    in a full flush, so the repeats form one valid deflate stream)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": (rows, features)}
    )
    head, size, block = buf.getvalue(), rows * features * 8, 1 << 24
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    zeros = deflate.compress(bytes(block)) + deflate.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(size, block)
    data += zeros * full + deflate.compress(bytes(rest)) + deflate.flush(zlib.Z_FINISH)
    crc = zlib.crc32(head)
    for _ in range(full):
        crc = zlib.crc32(bytes(block), crc)
    crc = zlib.crc32(bytes(rest), crc)
    name, unpacked = b"X.npy", len(head) + size
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), unpacked, len(name), 0
    )
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        *(0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), unpacked, len(name)),
        *(0, 0, 0, 0, 0, 0),
    )
    offset = len(local) + len(name) + len(data)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central) + len(name), offset, 0)
    return local + name + data + central + name + end


def costly_model(n_features: int = 4) -> bytes:
    """Loads at once, then runs a Loop of 10^15 iterations on any input."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["trips", "cond", "v0"], ["v"], body=body),
            helper.make_node("Add", ["X", "v"], ["Y"]),
        ],
        "costly",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n_features])],
        [
            helper.make_tensor("trips", TensorProto.INT64, [], [10**15]),
            helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
            helper.make_tensor("v0", TensorProto.FLOAT, [1], [0.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def _register_while_answering(
    api: Api, name: str, files: dict[str, tuple[str, bytes]]
) -> tuple[httpx.Response, float, int]:
    """Register, and meanwhile time the registry's answers to other requests; returns
    the registration's answer, the slowest other answer (s) and the peak RSS growth."""
    slowest = 0.0
    async with api.client(timeout=90) as client, api.client(timeout=10) as other:
        with PeakRss(api.service.pid or 0) as rss:
            upload = asyncio.create_task(
                client.post(f"/api/v1/models/{name}/versions", files=files)
            )
            while not upload.done():
                started = time.monotonic()
                resp = await other.get("/api/v1/models")
                assert resp.status_code == 200, resp.text
                slowest = max(slowest, time.monotonic() - started)
                await asyncio.sleep(0.1)
            answer = await upload
    return answer, slowest, rss.growth


async def test_a_deflate_bomb_is_refused_while_the_registry_answers(apis: dict[str, Api]) -> None:
    api = apis["registry"]
    iris = classifier("iris")
    bomb = deflate_bomb_npz(1 << 25)  # 1 GiB of zeros in about 1 MB
    assert len(bomb) < 2 * MiB
    resp, slowest, growth = await _register_while_answering(
        api,
        f"bomb{uuid.uuid4().hex[:6]}",
        {"model": ("m.onnx", iris.onnx), "reference": ("r.npz", bomb)},
    )
    print(f"deflate bomb → {resp.status_code} {resp.json()}; {slowest=:.2f} s; {growth=}")
    assert resp.status_code == 422, resp.text
    assert "once decompressed" in resp.json()["detail"]
    assert str(64 * MiB) in resp.json()["detail"]  # the limit, named
    assert slowest < 1.0
    assert growth < RSS_BUDGET


async def test_a_costly_graph_is_refused_while_the_registry_answers(apis: dict[str, Api]) -> None:
    api = apis["registry"]
    iris = classifier("iris")
    resp, slowest, growth = await _register_while_answering(
        api,
        f"costly{uuid.uuid4().hex[:6]}",
        {"model": ("m.onnx", costly_model()), "reference": ("r.npz", iris.reference)},
    )
    print(f"costly graph → {resp.status_code} {resp.json()}; {slowest=:.2f} s; {growth=}")
    assert resp.status_code == 422, resp.text
    assert "3 s of CPU" in resp.json()["detail"]
    assert slowest < 1.0
    assert growth < RSS_BUDGET
    # and a sound upload right after is registered
    async with api.client() as client:
        ok = await client.post(
            f"/api/v1/models/sound{uuid.uuid4().hex[:6]}/versions",
            files={"model": ("m.onnx", iris.onnx), "reference": ("r.npz", iris.reference)},
            data={"params": json.dumps({"threshold.accuracy": "0.9"})},
        )
    assert ok.status_code == 201, ok.text


# --- names and thresholds ------------------------------------------------------------------


async def test_a_bad_name_is_refused_with_its_rule(
    apis: dict[str, Api], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    registry, gateway, deployer = apis["registry"], apis["gateway"], apis["deployer"]
    onnx = classifier("iris").onnx
    async with registry.client() as client:
        resp = await client.post("/api/v1/models/Bad..Name/versions", files={"model": ("m", onnx)})
    assert resp.status_code == 422, resp.text
    assert "model names are 1-64 characters of a-z, 0-9" in resp.json()["detail"]
    async with gateway.client() as client:
        resp = await client.post("/v1/devices/x/enroll", json={"labels": {"env": "a,b=c"}})
    assert resp.status_code == 422, resp.text
    assert "label values are at most 256 characters, without ','" in resp.json()["detail"]
    async with gateway.client() as client:
        resp = await client.post("/v1/devices/-x/enroll", json={})
    assert resp.status_code == 422, resp.text
    assert "device ids are 1-128 characters" in resp.json()["detail"]
    async with deployer.client() as client:
        resp = await client.post(
            "/v1/rollouts", json={"model": "../m", "version": "1", "selector": {"a": "b"}}
        )
    assert resp.status_code == 422, resp.text
    assert "model names are" in resp.json()["detail"]

    model = tmp_path / "m.onnx"
    model.write_bytes(onnx)
    monkeypatch.setenv("EDGELOOP_REGISTRY_API", registry.url)
    monkeypatch.setenv("EDGELOOP_API_TOKEN", TOKEN)
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, ["models", "register", str(model), "--name", "../../etc/passwd"]
    )
    assert result.exit_code == 2, result.output
    assert "invalid model name '../../etc/passwd': model names are 1-64 characters" in (
        result.output
    )


async def test_a_threshold_below_the_minimum_needs_an_admin(apis: dict[str, Api]) -> None:
    api = apis["registry"]
    iris = classifier("iris")
    u = uuid.uuid4().hex[:6]
    async with api.client() as admin:
        resp = await admin.post(
            "/api/v1/tokens", json={"name": f"ds-{u}", "role": "data-scientist"}
        )
        assert resp.status_code == 201, resp.text
        scientist = resp.json()["token"]
    files = {"model": ("m.onnx", iris.onnx)}
    async with api.client(scientist) as client:
        low = await client.post(
            f"/api/v1/models/low{u}/versions",
            files=files,
            data={"params": json.dumps({"threshold.accuracy": "0"})},
        )
        assert low.status_code == 403, low.text
        assert "accuracy must be at least 0.8" in low.json()["detail"]
        assert "only an admin" in low.json()["detail"]
        unset = await client.post(f"/api/v1/models/low{u}/versions", files=files)
        assert unset.status_code == 201, unset.text
        assert unset.json()["params"]["threshold.accuracy"] == "0.8"  # the minimum applies
    async with api.client() as admin:
        lowered = await admin.post(
            f"/api/v1/models/low{u}/versions",
            files=files,
            data={"params": json.dumps({"threshold.accuracy": "0.5"})},
        )
    assert lowered.status_code == 201, lowered.text
    assert lowered.json()["params"]["threshold.accuracy"] == "0.5"
