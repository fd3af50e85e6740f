"""Fuzzing the gateway (DESIGN §6, §6a): the gateway, as its own process on private NATS
and PostgreSQL, takes thousands of hostile frames over real gRPC streams (bytes as they
are, so what does not decode reaches it): random bytes, truncated and bit-flipped
messages, and valid protobuf with hostile content (huge counts, NaN and Infinity, wrong
model or version, absurd windows, NUL characters, huge ids and names, labelled samples,
Hello twice, status reports of ever new versions) from enrolled devices, and sessions
that start wrong (telemetry or garbage before Hello, oversized or hostile Hello, another
device's id, a revoked device, a certificate of another CA, none at all).

Every frame is followed by a probe (a batch the gateway always refuses), so each answer
is known to belong to its frame: each bad frame gets its Error (the refusals counted for
the device in the registry), each good one its Ack; the gateway never crashes, stays
ready, keeps its memory bounded; honest devices' sessions go on as if nothing happened;
and nothing but the acknowledged batches reaches the TELEMETRY stream.

``make test`` sends 1,000 frames; ``make fuzz`` 10,000 (marker ``fuzz``);
``EDGELOOP_FUZZ_SEED`` repeats a run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import nats as nats_py
import pytest
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext

from edgeloop.contracts import subjects as s
from edgeloop.contracts.convert import BATCH_ID_NAMESPACE
from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import TelemetryBatch
from edgeloop.devstack.servers import NatsServer, free_port
from edgeloop.devstack.testing import api_up, eventually, stream_messages
from edgeloop.devstack.up import ServiceProcess
from edgeloop.gateway.pki import CertificateAuthority
from edgeloop.kit.consumer import parse_event
from tests.edge_harness import TOKEN
from tests.fuzz import ANY_ERROR, Frame, HostileFrames, fuzz_seed
from tests.watch import PeakRss, Readiness, ready, tracebacks

pytestmark = pytest.mark.slow

CONNECT = "/edgeloop.edge.v1.EdgeGateway/Connect"
MODEL, VERSION = "fzmodel", "1"
HONEST_MODEL = "honest"
FUZZ_SESSIONS = 4
HONEST_SESSIONS = 2
MAX_BYTES = 1 << 20
MAX_HELLO = 16 * 1024
MAX_COUNT = 100_000
#: what the gateway counts for the device (an Error naming a batch, but not a parse error)
NOT_COUNTED = ("invalid_message",)
#: the peak RSS the gateway may gain while it is fuzzed, and keep afterwards
RSS_PEAK_BUDGET = 200 << 20
RSS_KEPT_BUDGET = 64 << 20


@dataclass(frozen=True)
class Device:
    """An identity: a device id and the TLS credentials it connects with."""

    id: str
    creds: grpc.ChannelCredentials


@dataclass
class Gateway:
    """The gateway process and how to reach it."""

    proc: ServiceProcess
    api: httpx.AsyncClient
    address: str
    root: Path

    async def enroll(self, device_id: str, labels: dict[str, str] | None = None) -> Device:
        resp = await self.api.post(f"/v1/devices/{device_id}/enroll", json={"labels": labels or {}})
        assert resp.status_code == 201, resp.text
        body = resp.json()
        creds = grpc.ssl_channel_credentials(
            root_certificates=body["ca_certificate"].encode(),
            private_key=body["private_key"].encode(),
            certificate_chain=body["certificate"].encode(),
        )
        return Device(device_id, creds)

    async def refusals(self, device_id: str) -> dict[str, int]:
        resp = await self.api.get(f"/v1/devices/{device_id}")
        assert resp.status_code == 200, resp.text
        return dict(resp.json()["refusals"])

    def channel(self, creds: grpc.ChannelCredentials) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.address, creds)


@contextlib.asynccontextmanager
async def gateway(
    nats: NatsServer, dsn: str, registry_url: str, root: Path, unique: str
) -> AsyncIterator[Gateway]:
    """``python -m edgeloop.gateway`` on the test's own NATS and database."""
    health, api_port, grpc_port = free_port(), free_port(), free_port()
    prefix = "EDGELOOP_GATEWAY_"
    env = {
        "EDGELOOP_NATS_URL": nats.url,
        "EDGELOOP_DATABASE_URL": dsn,
        "EDGELOOP_OCI_REGISTRY_URL": registry_url,
        **{
            prefix + k: v
            for k, v in {
                "HTTP_PORT": str(health),
                "API_TOKENS": TOKEN,
                "API_PORT": str(api_port),
                "GRPC_PORT": str(grpc_port),
                "PKI_DIR": str(root / "pki"),
                "CACHE_DIR": str(root / "blobs"),
                "GATEWAY_ID": f"gw-fz-{unique}",
                "MAX_MESSAGE_BYTES": str(MAX_BYTES),
                "MAX_HELLO_BYTES": str(MAX_HELLO),
                "MAX_BATCH_COUNT": str(MAX_COUNT),
            }.items()
        },
    }
    proc = ServiceProcess("gateway", "edgeloop.gateway", health, env, root / "gateway.log")
    proc.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{api_port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        ) as api:
            await eventually(lambda: ready(api, proc.ready_url), within=120, what="gateway ready")
            await eventually(lambda: api_up(api), within=30, what="gateway API")
            yield Gateway(proc, api, f"127.0.0.1:{grpc_port}", root)
    finally:
        proc.terminate()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(proc.proc.wait, 30)  # type: ignore[union-attr]
        proc.kill()


# --- sessions -----------------------------------------------------------------------------


def _hello(device_id: str, model: str = MODEL, **fields: Any) -> bytes:
    hello = pb.Hello(device_id=device_id, model=model, version=VERSION, **fields)
    return bytes(pb.AgentMessage(hello=hello).SerializeToString())


def _probe(i: int, now: float) -> bytes:
    """A batch the gateway always refuses (its device never runs ``probe``@1)."""
    batch = pb.TelemetryBatch(batch_id=f"probe-{i}", model="probe", version="1", count=1)
    batch.window_start.FromNanoseconds(int((now - 1) * 1e9))
    batch.window_end.FromNanoseconds(int(now * 1e9))
    return bytes(pb.AgentMessage(telemetry=batch).SerializeToString())


def _answer(msg: pb.GatewayMessage) -> str:
    kind = msg.WhichOneof("kind")
    return f"error:{msg.error.code}" if kind == "error" else str(kind)


@dataclass
class Fed:
    """What one session's frames got: per frame, the answers between its probes."""

    device: str
    frames: list[Frame]
    answers: list[list[pb.GatewayMessage]] = field(default_factory=list)
    ended: str = ""
    """Why the stream ended before every probe was answered ("" when it did not)."""


async def feed(gw: Gateway, device: Device, frames: list[Frame], now: float) -> Fed:
    """Open ``device``'s session and send ``frames``, each followed by a probe."""
    fed = Fed(device.id, frames)
    async with gw.channel(device.creds) as channel:
        call = channel.stream_stream(
            CONNECT, request_serializer=None, response_deserializer=pb.GatewayMessage.FromString
        )()
        await call.write(_hello(device.id))
        welcome = await call.read()
        assert welcome != grpc.aio.EOF, f"{device.id}: no Welcome"
        assert welcome.WhichOneof("kind") == "welcome", welcome

        async def read() -> None:
            pending: list[pb.GatewayMessage] = []
            while len(fed.answers) < len(frames):
                msg = await call.read()
                if msg == grpc.aio.EOF:
                    fed.ended = f"the stream ended: {await call.code()} {await call.details()}"
                    return
                if msg.WhichOneof("kind") not in ("error", "ack"):
                    continue  # desired state, commands: not an answer
                if msg.error.batch_id == f"probe-{len(fed.answers)}":
                    fed.answers.append(pending)
                    pending = []
                else:
                    pending.append(msg)

        reader = asyncio.create_task(read())
        try:
            for i, frame in enumerate(frames):
                if reader.done():
                    break
                await call.write(frame.raw)
                await call.write(_probe(i, now))
            await asyncio.wait_for(asyncio.shield(reader), 120)
        except grpc.aio.AioRpcError as exc:
            fed.ended = f"the stream broke: {exc.code()} {exc.details()}"
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            with contextlib.suppress(Exception):
                await call.done_writing()
            call.cancel()
    return fed


def outcome(answers: list[pb.GatewayMessage]) -> str:
    """A frame's answers as one outcome ("silent", "ack", "error:<code>", or several)."""
    return "+".join(_answer(m) for m in answers) or "silent"


def allowed(frame: Frame, got: str) -> bool:
    return got in frame.expect or (
        ANY_ERROR in frame.expect and got.count(":") == 1 and (got.startswith("error:"))
    )


# --- sessions that start wrong ---------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """A session opened wrong: its first message (None: none at all), and the Error code
    (None: no answer) and gRPC status the gateway must end it with."""

    category: str
    device: Device
    first: bytes | None
    code: str | None
    status: grpc.StatusCode


async def attempt(gw: Gateway, a: Attempt) -> tuple[str | None, grpc.StatusCode]:
    code: str | None = None
    async with gw.channel(a.device.creds) as channel:
        call = channel.stream_stream(
            CONNECT, request_serializer=None, response_deserializer=pb.GatewayMessage.FromString
        )()
        try:
            if a.first is not None:
                await call.write(a.first)
            await call.done_writing()
            async with asyncio.timeout(30):
                while (msg := await call.read()) != grpc.aio.EOF:
                    if msg.WhichOneof("kind") == "error" and code is None:
                        code = msg.error.code
        except grpc.aio.AioRpcError as exc:
            return code, exc.code()
        return code, await call.code()


def first_frame_oracle(raw: bytes, device_id: str) -> tuple[str, grpc.StatusCode]:
    """How a session whose first message is ``raw`` is refused."""
    invalid = ("invalid_message", grpc.StatusCode.INVALID_ARGUMENT)
    if len(raw) > MAX_HELLO:
        return "too_large", grpc.StatusCode.INVALID_ARGUMENT
    try:
        msg = pb.AgentMessage.FromString(raw)
    except DecodeError:
        return invalid
    if msg.WhichOneof("kind") != "hello":
        return invalid
    assert msg.hello.device_id != device_id  # random bytes never name it
    return "permission_denied", grpc.StatusCode.PERMISSION_DENIED


def attempts(
    rng: random.Random, n: int, sess: Device, other: str, revoked: Device, strangers: list[Device]
) -> list[Attempt]:
    """``n`` sessions opened wrong, of every kind."""
    invalid = ("invalid_message", grpc.StatusCode.INVALID_ARGUMENT)
    frames = HostileFrames(
        rng,
        sess.id,
        MODEL,
        VERSION,
        other,
        now=time.time(),
        max_bytes=MAX_BYTES,
        max_count=MAX_COUNT,
    )
    out = []
    for _ in range(n):
        kind = rng.randrange(9)
        if kind == 0:
            raw = frames.valid_batch().SerializeToString()
            first = pb.AgentMessage(telemetry=pb.TelemetryBatch.FromString(raw))
            out.append(Attempt("telemetry_before_hello", sess, first.SerializeToString(), *invalid))
        elif kind == 1:
            raw = rng.randbytes(rng.choice((0, 5, 100, 5000, 20_000)))
            out.append(
                Attempt("garbage_before_hello", sess, raw, *first_frame_oracle(raw, sess.id))
            )
        elif kind == 2:
            labels = {f"k{i}": "v" * 250 for i in range(80)}
            first = _hello(sess.id, labels=labels)
            out.append(
                Attempt(
                    "hello_oversized", sess, first, "too_large", grpc.StatusCode.INVALID_ARGUMENT
                )
            )
        elif kind == 3:
            out.append(
                Attempt(
                    "hello_impostor",
                    sess,
                    _hello(other),
                    "permission_denied",
                    grpc.StatusCode.PERMISSION_DENIED,
                )
            )
        elif kind == 4:
            bad = rng.choice(
                (
                    {"labels": {"site": "a\x00b"}},
                    {"labels": {"bad key": "x"}},
                    {"labels": {f"k{i}": "v" for i in range(100)}},
                    {"labels": {"k\x00": "v"}},
                    {"model": "m\x00"},
                    {"model": "a b"},
                    {"digest": "sha256:\x00"},
                    {"digest": "d" * 5000},
                )
            )
            model = bad.pop("model", MODEL)
            first = _hello(sess.id, model=model, **bad)
            out.append(Attempt("hello_hostile", sess, first, *invalid))
        elif kind == 5:
            out.append(
                Attempt(
                    "revoked",
                    revoked,
                    _hello(revoked.id),
                    "permission_denied",
                    grpc.StatusCode.PERMISSION_DENIED,
                )
            )
        elif kind == 6:
            stranger = rng.choice(strangers)
            out.append(
                Attempt(
                    "stranger", stranger, _hello(stranger.id), None, grpc.StatusCode.UNAVAILABLE
                )
            )
        elif kind == 7:
            out.append(Attempt("no_message", sess, None, None, grpc.StatusCode.OK))
        else:
            first = pb.AgentMessage(status=pb.StatusReport(state=pb.DEVICE_STATE_RUNNING))
            out.append(Attempt("status_before_hello", sess, first.SerializeToString(), *invalid))
    return out


# --- honest devices ---------------------------------------------------------------------------


@dataclass
class Honest:
    """An honest device sending a valid batch every 50 ms while the fuzz runs."""

    device: Device
    sent: dict[str, float] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    ended: str = ""

    async def run(self, gw: Gateway, rng: random.Random, stop: asyncio.Event) -> None:
        frames = HostileFrames(
            rng,
            self.device.id,
            HONEST_MODEL,
            VERSION,
            "nobody",
            now=time.time(),
            max_bytes=MAX_BYTES,
            max_count=MAX_COUNT,
        )
        async with gw.channel(self.device.creds) as channel:
            call = channel.stream_stream(
                CONNECT,
                request_serializer=None,
                response_deserializer=pb.GatewayMessage.FromString,
            )()
            await call.write(_hello(self.device.id, model=HONEST_MODEL, labels={"site": "a"}))

            async def read() -> None:
                while (msg := await call.read()) != grpc.aio.EOF:
                    kind = msg.WhichOneof("kind")
                    if kind == "ack":
                        self.acked[msg.ack.batch_id] = time.monotonic()
                    elif kind == "error":
                        self.errors.append(f"{msg.error.code}: {msg.error.message}")
                self.ended = f"{await call.code()} {await call.details()}"

            reader = asyncio.create_task(read())
            try:
                while not stop.is_set() and not reader.done():
                    frames.now = time.time()
                    batch = frames.valid_batch()
                    self.sent[batch.batch_id] = time.monotonic()
                    await call.write(pb.AgentMessage(telemetry=batch).SerializeToString())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.05)
                await eventually(
                    lambda: self._all_acked(reader), within=30, what=f"{self.device.id} acked"
                )
            finally:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
                call.cancel()

    async def _all_acked(self, reader: asyncio.Task[None]) -> bool:
        return reader.done() or set(self.sent) <= set(self.acked)

    def latencies(self) -> list[float]:
        return sorted(self.acked[b] - t for b, t in self.sent.items() if b in self.acked)


# --- the telemetry that reached the bus --------------------------------------------------------


def _finite(batch: TelemetryBatch) -> bool:
    hists = [*batch.feature_histograms, batch.confidence_histogram, batch.latency_ms_histogram]
    numbers = [e for h in hists if h is not None for e in h.edges]
    for sample in batch.samples:
        numbers += [float(x) for x in sample.get("features", [])]
        numbers.append(float(sample.get("confidence", 0.0)))
    return all(math.isfinite(x) for x in numbers)


async def telemetry_on_the_bus(js: JetStreamContext, acked: dict[str, set[str]], where: str) -> int:
    """Every batch on TELEMETRY was acknowledged to its device, and is valid."""
    expected = {
        uuid.UUID(b) if _is_uuid(b) else uuid.uuid5(BATCH_ID_NAMESPACE, f"{d}/{b}")
        for d, ids in acked.items()
        for b in ids
    }
    stored = await stream_messages(js, s.STREAM_TELEMETRY, f"{s.TELEMETRY_PREFIX}.>")
    seen = set()
    for msg in stored:
        batch = parse_event(TelemetryBatch, msg.data)  # MalformedEvent if not
        assert batch.device_id in acked, f"{where}: telemetry of {batch.device_id} on the bus"
        assert (batch.model, batch.version) in {(MODEL, VERSION), (HONEST_MODEL, VERSION)}
        assert batch.inconsistency() is None, f"{where}: {batch.inconsistency()}"
        assert _finite(batch), f"{where}: {batch.event_id} holds NaN or Infinity"
        assert batch.event_id in expected, f"{where}: {batch.event_id} was never acknowledged"
        seen.add(batch.event_id)
    assert seen == expected, f"{where}: {len(expected - seen)} acknowledged batches not on the bus"
    return len(stored)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# --- the fuzz -------------------------------------------------------------------------------


async def fuzz_gateway(gw: Gateway, js: JetStreamContext, total: int, seed: int) -> None:
    rng = random.Random(seed)
    where = f"gateway (seed {seed})"
    fuzzers = [await gw.enroll(f"fz{i}", {"site": "a"}) for i in range(FUZZ_SESSIONS)]
    honest = [Honest(await gw.enroll(f"honest{i}", {"site": "a"})) for i in range(HONEST_SESSIONS)]
    sess = await gw.enroll("fz-sessions")
    revoked = await gw.enroll("fz-revoked")
    resp = await gw.api.post("/v1/devices/fz-revoked/revoke")
    assert resp.status_code == 200, resp.text
    foreign = CertificateAuthority.load_or_create(gw.root / "foreign-ca").issue_device("fz0")
    strangers = [
        Device(
            "fz0",  # an enrolled device's id, but a certificate of another CA
            grpc.ssl_channel_credentials(
                root_certificates=(gw.root / "pki" / "ca.crt").read_bytes(),
                private_key=foreign.key_pem,
                certificate_chain=foreign.cert_pem,
            ),
        ),
        Device(  # no client certificate at all
            "fz0", grpc.ssl_channel_credentials((gw.root / "pki" / "ca.crt").read_bytes())
        ),
    ]

    n_attempts = max(20, total // 40)
    n_frames = total - n_attempts
    now = time.time()
    makers = [
        HostileFrames(
            rng,
            d.id,
            MODEL,
            VERSION,
            fuzzers[(i + 1) % len(fuzzers)].id,
            now=now,
            max_bytes=MAX_BYTES,
            max_count=MAX_COUNT,
        )
        for i, d in enumerate(fuzzers)
    ]
    per_session: list[list[Frame]] = [[] for _ in fuzzers]
    for i in range(n_frames):
        per_session[i % len(fuzzers)].append(makers[i % len(fuzzers)].draw())
    wrong = attempts(rng, n_attempts, sess, fuzzers[0].id, revoked, strangers)

    log_start = gw.proc.log_path.stat().st_size
    stop = asyncio.Event()
    honest_tasks = [
        asyncio.create_task(h.run(gw, random.Random(seed + i), stop)) for i, h in enumerate(honest)
    ]

    async def honest_acked() -> bool:
        return all(h.acked for h in honest)

    await eventually(honest_acked, what="honest devices acked")
    started = time.monotonic()
    async with Readiness(gw.proc) as readiness:
        with PeakRss(gw.proc.pid or 0) as rss:

            async def wrong_sessions() -> list[tuple[str | None, grpc.StatusCode]]:
                return [await attempt(gw, a) for a in wrong]

            fed, refused = await asyncio.gather(
                asyncio.gather(
                    *(feed(gw, d, f, now) for d, f in zip(fuzzers, per_session, strict=True))
                ),
                wrong_sessions(),
            )
            fuzzed = time.monotonic() - started
            stop.set()
            await asyncio.gather(*honest_tasks)
        # after: a fuzzed device opens a good session and its batch is taken
        maker = HostileFrames(
            rng,
            fuzzers[0].id,
            MODEL,
            VERSION,
            "x",
            now=time.time(),
            max_bytes=MAX_BYTES,
            max_count=MAX_COUNT,
        )
        after = await feed(gw, fuzzers[0], [maker._valid()], time.time())
        got = [outcome(a) for a in after.answers]
        assert got == ["ack"], f"{where}: a valid batch after the fuzz: {got} {after.ended}"
        fed = [*fed, after]
        await asyncio.sleep(1.5)  # the last refusals reach the registry (flushed each second)
    rss_after = rss.now()
    elapsed = time.monotonic() - started

    # every frame answered as it should be, on a session that stayed open
    mismatches: dict[str, list[str]] = collections.defaultdict(list)
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for f in fed:
        assert not f.ended, (
            f"{where}: {f.device}'s session ended after {len(f.answers)} of {len(f.frames)} "
            f"frames ({f.ended}); the next was {f.frames[len(f.answers)].category}"
        )
        for frame, answers in zip(f.frames, f.answers, strict=True):
            got = outcome(answers)
            outcomes[frame.category][got] += 1
            if not allowed(frame, got):
                mismatches[frame.category].append(
                    f"{got} (wanted {sorted(frame.expect)}): {[m.error.message for m in answers]}"
                )
    for a, (code, status) in zip(wrong, refused, strict=True):
        got = f"{code or 'no answer'}/{status.name}"
        outcomes[a.category][got] += 1
        if (code, status) != (a.code, a.status):
            mismatches[a.category].append(f"{got} (wanted {a.code}/{a.status.name})")
    assert not mismatches, f"{where}: answers not as expected: " + "; ".join(
        f"{c} x{len(m)}: {m[:3]}" for c, m in mismatches.items()
    )

    # the refusals are counted for each device (probes included: wrong_version)
    by_device: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for f in fed:
        for answers in f.answers:
            for m in answers:
                if m.WhichOneof("kind") == "error" and m.error.batch_id:
                    code = "over_budget" if m.error.code == "unavailable" else m.error.code
                    if code not in NOT_COUNTED:
                        by_device[f.device][code] += 1
        by_device[f.device]["wrong_version"] += len(f.answers)
    for device, counted in by_device.items():
        await eventually(
            lambda d=device, c=counted: _counted(gw, d, c),
            within=15,
            what=f"{where}: {device}'s refusals counted ({dict(counted)})",
        )

    # the honest went on
    for h in honest:
        assert not h.errors, f"{where}: {h.device.id} got errors: {h.errors[:5]}"
        assert not h.ended, f"{where}: {h.device.id}'s session ended: {h.ended}"
        assert set(h.sent) <= set(h.acked), f"{where}: {h.device.id}: batches not acked"

    # nothing reached the bus but what was acknowledged
    acked: dict[str, set[str]] = collections.defaultdict(set)
    for f in fed:
        for frame, answers in zip(f.frames, f.answers, strict=True):
            if outcome(answers) == "ack":  # (a bit-flipped batch may be valid still)
                acked[f.device].add(pb.AgentMessage.FromString(frame.raw).telemetry.batch_id)
    for h in honest:
        acked[h.device.id] |= set(h.acked)
    on_bus = await telemetry_on_the_bus(js, acked, where)

    # the process: never down, never not ready, no traceback, memory bounded
    assert not readiness.failures, f"{where}: not ready at {readiness.failures[:5]}"
    assert gw.proc.running, f"{where}: the gateway exited"
    found = tracebacks(gw.proc.log_path, since=log_start)
    assert not found, f"{where}: {len(found)} tracebacks in the gateway's log: {found[0]}"
    assert rss.growth < RSS_PEAK_BUDGET, f"{where}: peak RSS grew by {rss.growth >> 20} MiB"
    kept = rss_after - rss.base
    assert kept < RSS_KEPT_BUDGET, f"{where}: RSS kept {kept >> 20} MiB after the fuzz"

    frames_sent = sum(len(f.frames) for f in fed) + len(wrong)
    latencies = [x for h in honest for x in h.latencies()]
    print(
        f"gateway: {frames_sent} frames ({sum(len(f.frames) for f in fed)} on {len(fed)} "
        f"sessions, each followed by a probe; {len(wrong)} sessions opened wrong) in "
        f"{fuzzed:.1f}s (total {elapsed:.1f}s); {on_bus} batches on the bus, all acknowledged; "
        f"honest devices: {sum(len(h.sent) for h in honest)} batches, all acked, p99 "
        f"{latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms; RSS {rss.base >> 20} MiB "
        f"before, peak {rss.peak >> 20} MiB, {rss_after >> 20} MiB after; readiness checked "
        f"{readiness.checks} times, never failing"
    )
    for category in sorted(outcomes):
        print(f"  {category}: {dict(outcomes[category])}")
    print(f"  refusals counted per device: { {d: dict(c) for d, c in by_device.items()} }")


async def _counted(gw: Gateway, device: str, expected: collections.Counter[str]) -> bool:
    return await gw.refusals(device) == dict(expected)


@pytest.mark.parametrize(
    "total",
    [
        pytest.param(1_000, marks=pytest.mark.timeout(300), id="short"),
        # `make fuzz`; deselected otherwise (addopts: -m 'not chaos and not fuzz')
        pytest.param(10_000, marks=[pytest.mark.fuzz, pytest.mark.timeout(1200)], id="full"),
    ],
)
async def test_hostile_frames_are_refused_per_device_and_the_gateway_goes_on(
    total: int,
    nats_private: NatsServer,
    private_dsn: str,
    registry_url: str,
    tmp_path: Path,
    unique: str,
) -> None:
    seed = fuzz_seed(f"gateway, {total} frames")
    nc = await nats_py.connect(nats_private.url)
    try:
        async with gateway(nats_private, private_dsn, registry_url, tmp_path, unique) as gw:
            await fuzz_gateway(gw, nc.jetstream(), total, seed)
    finally:
        await nc.close()
