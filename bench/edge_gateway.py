"""Edge benchmarks: the gateway as its own process on real NATS/PostgreSQL/OCI registry.

- ``telemetry``: telemetry batches of 256 inferences pushed by many device sessions
  through the gateway onto the bus (each acknowledged once on JetStream), against raw
  nats-py publishing the same bus bytes with the same concurrency, in the same run.
- ``telemetry`` with ``telemetry_checks=False`` (``make bench ARGS="--only
  edge-gateway"``): the same through a gateway whose checks at entry are switched off
  (a switch of ``bench.gateway_process`` only), to see what the checks cost.
- ``rollout``: desired state written for N real agents (one process, shared onnxruntime
  session) → each device running the new model: p50/p99.
- ``connections``: many device sessions held open, each sending a batch every 10 s:
  the gateway's CPU and memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import nats
import psutil
from google.protobuf.timestamp_pb2 import Timestamp

from edgeloop.contracts import subjects as s
from edgeloop.contracts.convert import telemetry_from_proto
from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.devstack.servers import free_port
from edgeloop.edge.fleet import Fleet, FleetOptions
from edgeloop.kit.bus import declare_topology
from tests.edge_harness import PUBLIC

TOKEN = "bench-edge-token-1-3f8e6a2c"
PROJECT = Path(__file__).resolve().parents[1]


class Gateway:
    """The gateway as its own process (``python -m bench.gateway_process``: the gateway
    with the benchmarks' switches) with its own ports, PKI and cache."""

    def __init__(
        self,
        root: Path,
        nats_url: str,
        dsn: str,
        registry_url: str,
        *,
        telemetry_checks: bool = True,
        profile: Path | None = None,
    ) -> None:
        self.root = root
        self.args = ["--telemetry-checks", "on" if telemetry_checks else "off"]
        if profile is not None:
            self.args += ["--profile", str(profile)]
        root.mkdir(parents=True, exist_ok=True)
        (root / "signing.pub").write_bytes(PUBLIC)
        self.grpc_port, self.api_port, http = free_port(), free_port(), free_port()
        self.env = {
            **os.environ,
            "EDGELOOP_NATS_URL": nats_url,
            "EDGELOOP_DATABASE_URL": dsn,
            "EDGELOOP_OCI_REGISTRY_URL": registry_url,
            "EDGELOOP_GATEWAY_API_TOKENS": TOKEN,
            "EDGELOOP_GATEWAY_GRPC_PORT": str(self.grpc_port),
            "EDGELOOP_GATEWAY_API_PORT": str(self.api_port),
            "EDGELOOP_GATEWAY_HTTP_PORT": str(http),
            "EDGELOOP_GATEWAY_PKI_DIR": str(root / "pki"),
            "EDGELOOP_GATEWAY_CACHE_DIR": str(root / "cache"),
            "EDGELOOP_GATEWAY_SIGNING_PUBLIC_KEY": str(root / "signing.pub"),
            "EDGELOOP_GATEWAY_HEARTBEAT_SECONDS": "30",
            "EDGELOOP_LOG_LEVEL": "WARNING",
        }
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def start(self) -> None:
        log = (self.root / "gateway.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.gateway_process",  # the gateway, with the benchmarks' switches
            *self.args,
            env=self.env,
            stdout=log,
            stderr=log,
            cwd=PROJECT,
        )
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                try:
                    if (await client.get(f"{self.api}/docs")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"gateway did not start; see {self.root / 'gateway.log'}")

    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)


async def enroll(api: str, ids: list[str], root: Path) -> dict[str, dict[str, Any]]:
    """Bundles of ``ids`` through the gateway's API (16 at a time)."""
    sem = asyncio.Semaphore(16)
    out: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(
        base_url=api, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
    ) as client:

        async def one(device: str) -> None:
            async with sem:
                resp = await client.post(f"/v1/devices/{device}/enroll", json={"labels": {}})
                resp.raise_for_status()
                out[device] = resp.json()

        await asyncio.gather(*(one(d) for d in ids))
    return out


def _channel(address: str, bundle: dict[str, Any]) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=bundle["ca_certificate"].encode(),
        private_key=bundle["private_key"].encode(),
        certificate_chain=bundle["certificate"].encode(),
    )
    return grpc.aio.secure_channel(address, creds)


def _batch(device: str, model: str = "bench", records: int = 256) -> pb.TelemetryBatch:
    now = Timestamp()
    now.GetCurrentTime()
    feature_edges = [float(x) for x in range(1, 11)]
    return pb.TelemetryBatch(
        batch_id=str(uuid.uuid4()),
        device_id=device,
        model=model,
        version="1",
        digest="sha256:" + "0" * 64,
        window_start=now,
        window_end=now,
        count=records,
        errors=1,
        low_confidence=12,
        feature_names=["a", "b", "c", "d"],
        # consistent counts (the gateway refuses others): every inference in a bin
        feature_histograms=[
            pb.Histogram(
                edges=feature_edges, counts=[*[records // 11] * 10, records - records // 11 * 10]
            )
            for _ in range(4)
        ],
        prediction_counts={"0": records // 2, "1": records - records // 2},
        confidence_histogram=pb.Histogram(edges=[0.5, 0.9], counts=[12, 100, records - 112]),
        latency_ms_histogram=pb.Histogram(edges=[0.1, 1.0], counts=[200, 56, 0]),
    )


async def _pump(
    address: str,
    device: str,
    bundle: dict[str, Any],
    payloads: list[bytes],
    window: int,
    model: str = "bench",
    version: str = "1",
) -> None:
    async with _channel(address, bundle) as channel:
        call = channel.stream_stream(
            "/edgeloop.edge.v1.EdgeGateway/Connect",
            request_serializer=lambda b: b,
            response_deserializer=pb.GatewayMessage.FromString,
        )()
        hello = pb.AgentMessage(hello=pb.Hello(device_id=device)).SerializeToString()
        await call.write(hello)
        welcome = await call.read()
        assert welcome.WhichOneof("kind") == "welcome", welcome
        # the device says what it runs: telemetry for anything else is refused at entry
        running = pb.StatusReport(state=pb.DEVICE_STATE_RUNNING, model=model, version=version)
        await call.write(pb.AgentMessage(status=running).SerializeToString())
        credit = asyncio.Semaphore(window)
        acked = 0

        async def reader() -> None:
            nonlocal acked
            while acked < len(payloads):
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    raise RuntimeError("stream ended early")
                if msg.WhichOneof("kind") == "ack":
                    acked += 1
                    credit.release()
                elif msg.WhichOneof("kind") == "error":
                    raise RuntimeError(msg.error.message)

        async def writer() -> None:
            for data in payloads:
                await credit.acquire()
                await call.write(data)

        task = asyncio.create_task(reader())
        writing = asyncio.create_task(writer())
        try:
            await task  # every batch acknowledged, or the error that ended the run
        finally:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writing
        await call.done_writing()


#: A per-device telemetry budget no run of the telemetry benchmark reaches: the budget is
#: checked and spent for every batch (what is measured), but never holds one back.
UNREACHED_BUDGET = {
    "EDGELOOP_GATEWAY_DEVICE_BATCHES_PER_SECOND": "1e9",
    "EDGELOOP_GATEWAY_DEVICE_RECORDS_PER_SECOND": "1e12",
    "EDGELOOP_GATEWAY_DEVICE_BYTES_PER_SECOND": "1e15",
}


async def telemetry(
    nats_url: str,
    dsn: str,
    registry_url: str,
    root: Path,
    *,
    devices: int,
    batches: int,
    telemetry_checks: bool = True,
    raw_baseline: bool = True,
    name: str = "telemetry",
    profile: Path | None = None,
) -> dict[str, Any]:
    """Records/s through the gateway (its telemetry checks at entry on, or switched off
    by ``bench.gateway_process``) and, with ``raw_baseline``, raw nats-py publishing the
    same bus bytes."""
    gw = Gateway(
        root / f"gw-{name}",
        nats_url,
        dsn,
        registry_url,
        telemetry_checks=telemetry_checks,
        profile=profile,
    )
    gw.env.update(UNREACHED_BUDGET)
    await gw.start()
    try:
        ids = [f"{name}-{i:04d}" for i in range(devices)]
        bundles = await enroll(gw.api, ids, root)
        per = batches // devices
        payloads = {
            d: [pb.AgentMessage(telemetry=_batch(d)).SerializeToString() for _ in range(per)]
            for d in ids
        }
        proc = gw.process()
        cpu0 = proc.cpu_times()
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                _pump(f"127.0.0.1:{gw.grpc_port}", d, bundles[d], payloads[d], window=32)
                for d in ids
            )
        )
        wall = time.perf_counter() - t0
        cpu1 = proc.cpu_times()
        gateway_cpu_s = cpu1.user + cpu1.system - cpu0.user - cpu0.system
        total = per * devices
    finally:
        await gw.stop()
    out: dict[str, Any] = {
        "devices": devices,
        "batches": total,
        "records_per_batch": 256,
        "telemetry_checks": telemetry_checks,
        "gateway_batches_per_s": round(total / wall),
        "gateway_records_per_s": round(total * 256 / wall),
        "gateway_cpu_cores": round(gateway_cpu_s / wall, 2),
        "gateway_cpu_us_per_batch": round(gateway_cpu_s / total * 1e6, 1),
        "wire_bytes_per_batch": len(payloads[ids[0]][0]),
    }
    if not raw_baseline:
        return out

    # baseline: the same bus bytes, published by raw nats-py with the same concurrency
    bus = [
        telemetry_from_proto(pb.AgentMessage.FromString(p).telemetry)
        for d in ids
        for p in payloads[d]
    ]
    raw = [(e.bus_subject(), e.model_dump_json().encode(), str(uuid.uuid4())) for e in bus]
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await declare_topology(js)
    sem = asyncio.Semaphore(devices * 32)

    async def publish(subject: str, data: bytes, msg_id: str) -> None:
        async with sem:
            await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})

    t0 = time.perf_counter()
    await asyncio.gather(*(publish(*r) for r in raw))
    raw_wall = time.perf_counter() - t0
    await nc.close()
    return {
        **out,
        "raw_nats_batches_per_s": round(total / raw_wall),
        "raw_nats_records_per_s": round(total * 256 / raw_wall),
        "bus_bytes_per_batch": len(raw[0][1]),
    }


def checks_in_process(repeat: int = 20_000) -> dict[str, float]:
    """What the gateway's telemetry checks cost per batch, timed in this process on the
    benchmark's batch: the protobuf → event conversion every batch goes through anyway,
    and on top of it ``check_batch`` and one budget ``take`` (µs, best of 5)."""
    import timeit
    from datetime import UTC, datetime

    from edgeloop.gateway.trust import Budget, BudgetLimits, TelemetryPolicy, check_batch

    batch = _batch("tp-0000")
    event = telemetry_from_proto(batch)
    runs = {("bench", "1")}
    policy = TelemetryPolicy()
    budget = Budget(BudgetLimits(1e12, 1e12, 1e15), max_count=policy.max_count, max_bytes=1 << 20)

    def check() -> None:
        check_batch(event, runs=runs, now=datetime.now(UTC), policy=policy)
        budget.take(event.count, 1000)

    def convert() -> None:
        telemetry_from_proto(batch)

    def best(fn: Any) -> float:
        return min(timeit.repeat(fn, number=repeat, repeat=5)) / repeat * 1e6

    return {"convert_us": round(best(convert), 2), "checks_us": round(best(check), 2)}


async def rollout(
    nats_url: str, dsn: str, registry_url: str, root: Path, *, devices: int
) -> dict[str, Any]:
    """Desired state → every device running the model: p50/p99 over ``devices``."""
    from edgeloop.contracts.signing import release_annotations
    from edgeloop.contracts.twin import DesiredModel
    from edgeloop.kit.oci import OciClient
    from edgeloop.kit.oci.client import sha256
    from edgeloop.kit.oci.image import build_model_image, push_image
    from edgeloop.kit.oci.signing import attach_signature, load_private_key
    from tests.edge_harness import PRIVATE, Image, edge_stack  # noqa: F401  (image helpers)
    from tests.modelzoo import classifier

    gw = Gateway(root / "gw-rollout", nats_url, dsn, registry_url)
    await gw.start()
    fleet = Fleet(
        FleetOptions(
            devices=devices,
            gateway_api=gw.api,
            token=TOKEN,
            state_dir=root / "fleet",
            prefix="ro",
            infer_seconds=3600,
            telemetry_seconds=3600,
        )
    )
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(fleet.prepare)
        reached: dict[str, float] = {}

        def on_status(agent: Any) -> None:
            if agent.state == pb.DEVICE_STATE_RUNNING and agent.config.device_id not in reached:
                reached[agent.config.device_id] = time.perf_counter()

        for agent in fleet.agents:
            agent.on_status = on_status
        task = asyncio.create_task(fleet.run(stop, None))
        t_connect = time.perf_counter()
        while fleet.counts()["connected"] < devices:
            await asyncio.sleep(0.2)
            if time.perf_counter() - t_connect > 300:
                raise RuntimeError(f"only {fleet.counts()['connected']} devices connected")
        connect_s = time.perf_counter() - t_connect

        onnx = classifier("iris").onnx
        built = build_model_image(
            {"model/model.onnx": onnx},
            annotations={"edgeloop.model": "bench", "edgeloop.model_digest": sha256(onnx)},
        )
        async with OciClient(registry_url) as oci:
            digest = await push_image(oci, "bench/images/iris", built, tag="1")
            await attach_signature(
                oci,
                "bench/images/iris",
                digest,
                load_private_key(PRIVATE),
                annotations=release_annotations("iris", "1", 1),
            )
        doc = DesiredModel(
            model="iris",
            version="1",
            image=f"{registry_url.split('://')[1]}/bench/images/iris",
            manifest_digest=digest,
        ).to_bytes()
        nc = await nats.connect(nats_url)
        kv = await nc.jetstream().key_value(s.KV_DESIRED)
        written: dict[str, float] = {}
        t0 = time.perf_counter()
        for agent in fleet.agents:
            await kv.put(s.kv_key(agent.config.device_id), doc)
            written[agent.config.device_id] = time.perf_counter()
        write_s = time.perf_counter() - t0
        while len(reached) < devices and time.perf_counter() - t0 < 600:
            await asyncio.sleep(0.1)
        all_s = time.perf_counter() - t0
        await nc.close()
        lat = sorted(reached[d] - written[d] for d in reached)
        stop.set()
        await task
    finally:
        stop.set()
        await gw.stop()
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
    return {
        "devices": devices,
        "converged": len(lat),
        "connect_all_s": round(connect_s, 2),
        "desired_written_s": round(write_s, 2),
        "all_running_s": round(all_s, 2),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
    }


async def enroll_direct(root: Path, dsn: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Bundles of ``ids`` signed by the gateway's CA and stored as its API would.

    For thousands of devices the API's one-at-a-time enrolment is not what is measured;
    this issues the same certificates with the same CA into the same device table.
    """
    import asyncpg

    from edgeloop.gateway.devices import DeviceStore
    from edgeloop.gateway.pki import CertificateAuthority

    ca = CertificateAuthority.load_or_create(root / "pki")
    issued = await asyncio.to_thread(lambda: {d: ca.issue_device(d) for d in ids})
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8)
    assert pool is not None
    try:
        store = DeviceStore(pool, "gateway")
        sem = asyncio.Semaphore(8)

        async def one(d: str) -> None:
            async with sem:
                await store.enroll(d, {"bench": "connections"}, issued[d], actor="bench")

        await asyncio.gather(*(one(d) for d in ids))
    finally:
        await pool.close()
    ca_pem = ca.cert_pem.decode()
    return {
        d: {
            "certificate": c.cert_pem.decode(),
            "private_key": c.key_pem.decode(),
            "ca_certificate": ca_pem,
        }
        for d, c in issued.items()
    }


async def connections(
    nats_url: str,
    dsn: str,
    registry_url: str,
    root: Path,
    *,
    devices: int,
    seconds: float,
    workers: int = 4,
    rate: float = 200.0,
) -> dict[str, Any]:
    """``devices`` sessions, a telemetry batch each every 10 s: the gateway's CPU and RSS.

    The sessions are held by ``workers`` processes (``bench.edge_sessions``), opening
    ``rate`` sessions a second in all.
    """
    gw = Gateway(root / "gw-conn", nats_url, dsn, registry_url)
    gw.env["EDGELOOP_LOG_LEVEL"] = "INFO"  # why sessions are refused or end
    await gw.start()
    ids = [f"cx-{i:05d}" for i in range(devices)]
    procs: list[asyncio.subprocess.Process] = []
    state: list[dict[str, Any]] = [{} for _ in range(workers)]
    errors: list[str] = []
    try:
        t0 = time.perf_counter()
        bundles = await enroll_direct(gw.root, dsn, ids)
        enroll_s = time.perf_counter() - t0
        readers = []
        for w in range(workers):
            part = {d: bundles[d] for d in ids[w::workers]}
            path = root / f"sessions-{w}.json"
            path.write_text(json.dumps(part))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.edge_sessions",
                f"127.0.0.1:{gw.grpc_port}",
                str(path),
                str(rate / workers),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=PROJECT,
            )
            procs.append(proc)

            async def read(w: int = w, proc: asyncio.subprocess.Process = proc) -> None:
                assert proc.stdout is not None
                async for line in proc.stdout:
                    doc = json.loads(line)
                    if "error" in doc:
                        errors.append(doc["error"])
                    else:
                        state[w] = doc

            readers.append(asyncio.create_task(read()))

        def total(key: str) -> int:
            return int(sum(s.get(key, 0) for s in state))

        t1 = time.perf_counter()
        while total("connected") < devices and time.perf_counter() - t1 < 900:
            await asyncio.sleep(0.5)
            if int(time.perf_counter() - t1) % 30 == 0:
                elapsed = time.perf_counter() - t1
                print(f"  {elapsed:.0f} s: {total('connected')} connected", flush=True)
        connect_s = time.perf_counter() - t1
        gateway = gw.process()
        await asyncio.sleep(12)  # every session has sent its first batch
        cpu0, a0, w0 = gateway.cpu_times(), total("acked"), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1, a1, w1 = gateway.cpu_times(), total("acked"), time.perf_counter()
        rss = gateway.memory_info().rss
        connected, held_errors = total("connected"), total("errors")
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 120)
        await asyncio.gather(*readers, return_exceptions=True)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
        await gw.stop()
        log = gw.root / "gateway.log"
        if log.exists():  # what the gateway said about refused or broken sessions
            print(_log_summary(log.read_text()), flush=True)
    return {
        "devices": devices,
        "connected": connected,
        "errors_while_held": held_errors,  # sessions that failed before the shutdown
        "errors_with_shutdown": total("errors"),
        "error_reasons": _merge_reasons(state),
        "first_errors": errors[:3],
        "load_processes": workers,
        "enroll_s": round(enroll_s, 1),
        "connect_all_s": round(connect_s, 1),
        "batches_per_s": round((a1 - a0) / (w1 - w0), 1),
        "gateway_cpu_cores": round(
            (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (w1 - w0), 3
        ),
        "gateway_rss_mb": round(rss / 2**20, 1),
    }


def _log_summary(text: str) -> str:
    """The gateway's log lines counted by what they say (device ids and numbers elided)."""
    said: dict[str, int] = {}
    for line in text.splitlines():
        said_ = line.split(" ", 5)[-1] if line[:2] == "20" else line  # drop the timestamp
        key = re.sub(r"cx-\d+|[0-9a-f]{32}|\d+(\.\d+)?", "#", said_)[:160]
        said[key] = said.get(key, 0) + 1
    top = sorted(said.items(), key=lambda kv: -kv[1])[:25]
    return "\n".join(f"{n:>8} x {key}" for key, n in top)


def _merge_reasons(state: list[dict[str, Any]]) -> dict[str, int]:
    """Why the load generator's sessions ended, summed over its processes."""
    reasons: dict[str, int] = {}
    for worker in state:
        for reason, n in worker.get("reasons", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
    return dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:10])


def dump(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2)
