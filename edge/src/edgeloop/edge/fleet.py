"""The fleet simulator: N agents in one process against a gateway.

Each simulated device is a real :class:`~edgeloop.edge.agent.Agent` with its own
certificate (enrolled through the gateway's API), state directory and gRPC session;
they share one onnxruntime session per model digest. Faults are injected on purpose:
drift in a feature after a delay, devices dropping offline for a period, slow links and
corrupted downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.parsing import parse_duration
from edgeloop.edge.agent import Agent, AgentConfig, Faults, ModelCache
from edgeloop.edge.buffer import MemoryBuffer
from edgeloop.edge.bundle import write_bundle


@dataclass(frozen=True)
class Offline:
    """``fraction=0.1,period=30s``: every period, that fraction of devices drops offline
    for the period."""

    fraction: float
    period: float

    @classmethod
    def parse(cls, text: str) -> Offline:
        """Parse the CLI form (ValueError naming the bad part)."""
        parts = _pairs(text, "--offline", {"fraction", "period"})
        fraction = float(parts.get("fraction", "0.1"))
        if not 0 <= fraction <= 1:
            raise ValueError(f"--offline fraction must be within 0..1, got {fraction}")
        return cls(fraction, parse_duration(parts.get("period", "30s")))


@dataclass(frozen=True)
class Slow:
    """``fraction=0.1,rate=200k``: that fraction of devices downloads at ``rate`` bytes/s."""

    fraction: float
    rate: float

    @classmethod
    def parse(cls, text: str) -> Slow:
        """Parse the CLI form."""
        parts = _pairs(text, "--slow", {"fraction", "rate"})
        rate = parts.get("rate", "100k").lower()
        scale = {"k": 1e3, "m": 1e6}.get(rate[-1:], 1.0)
        return cls(float(parts.get("fraction", "0.1")), float(rate.rstrip("km")) * scale)


def _pairs(text: str, what: str, allowed: set[str]) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in allowed:
            raise ValueError(
                f"{what}: expected {','.join(sorted(allowed))} as key=value, got {part!r}"
            )
        out[key] = value
    return out


@dataclass
class FleetOptions:
    """What ``edgeloop fleet simulate`` was asked for."""

    devices: int
    gateway_api: str
    token: str
    state_dir: Path
    prefix: str = "sim"
    labels: dict[str, str] = field(default_factory=dict)
    drift: str | None = None
    drift_devices: float = 1.0
    offline: Offline | None = None
    slow: Slow | None = None
    corrupt: float = 0.0
    telemetry_seconds: float = 10.0
    infer_seconds: float = 1.0
    infer_batch: int = 16
    duration: float | None = None
    seed: int = 0
    gateway: str | None = None
    """host:port override (default: the address the enrolment bundle names)."""


#: Seconds enrolment waits for a gateway API that refuses connections (starting up).
ENROL_PATIENCE = 60.0


def device_ids(prefix: str, n: int) -> list[str]:
    """``prefix-00000`` … (stable: a re-run reuses the same devices)."""
    return [f"{prefix}-{i:05d}" for i in range(n)]


def enroll(opts: FleetOptions, device_id: str) -> AgentConfig:
    """The device's bundle: enrolled through the gateway's API once, then reused."""
    bundle = opts.state_dir / device_id
    config_file = bundle / "agent.json"
    if not config_file.exists():
        request = urllib.request.Request(
            f"{opts.gateway_api.rstrip('/')}/v1/devices/{device_id}/enroll",
            data=json.dumps({"labels": opts.labels}).encode(),
            headers={"Authorization": f"Bearer {opts.token}", "Content-Type": "application/json"},
            method="POST",
        )
        deadline = time.monotonic() + ENROL_PATIENCE
        while True:
            try:
                with urllib.request.urlopen(request, timeout=60) as resp:
                    body = json.loads(resp.read())
                break
            except urllib.error.HTTPError as exc:
                raise RuntimeError(
                    f"enrolment of {device_id} refused ({exc.code}): {exc.read().decode()[:300]}"
                ) from exc
            except urllib.error.URLError:
                # the gateway is (re)starting: its API comes up in a moment
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        write_bundle(bundle, body)
    config = AgentConfig.load(config_file)
    config.telemetry_seconds = opts.telemetry_seconds
    config.infer_seconds = opts.infer_seconds
    config.infer_batch = opts.infer_batch
    if opts.gateway:
        config.gateway = opts.gateway
    return config


class Fleet:
    """N simulated devices in this event loop."""

    def __init__(self, opts: FleetOptions) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.models = ModelCache()
        self.agents: list[Agent] = []
        self.started = time.monotonic()

    def prepare(self) -> None:
        """Enrol (or reuse) every device and build its agent."""
        ids = device_ids(self.opts.prefix, self.opts.devices)
        with ThreadPoolExecutor(max_workers=16) as pool:
            configs = list(pool.map(lambda d: enroll(self.opts, d), ids))
        drifting = set(self.rng.sample(ids, round(len(ids) * self.opts.drift_devices)))
        for config in configs:
            if self.opts.drift and config.device_id in drifting:
                config.drift = self.opts.drift
            slow = self.opts.slow
            faults = Faults(
                corrupt_download=self.opts.corrupt,
                slow_link_bytes_per_s=slow.rate
                if slow and self.rng.random() < slow.fraction
                else None,
            )
            self.agents.append(
                Agent(
                    config,
                    models=self.models,
                    buffer=MemoryBuffer(max_batches=360),
                    faults=faults,
                    seed=self.rng.randrange(1 << 30),
                )
            )

    def set_drift(self, drift: str | None) -> None:
        """Inject drift into every device's inputs now (or end it)."""
        for agent in self.agents:
            agent.set_drift(drift)

    async def run(self, stop: asyncio.Event, out: TextIO | None = sys.stdout) -> None:
        """Run every agent until ``stop`` (or the duration) ends it, printing a summary."""
        tasks = [asyncio.create_task(a.run(stop)) for a in self.agents]
        extra = [asyncio.create_task(self._summary(stop, out))] if out is not None else []
        if self.opts.offline and self.opts.offline.fraction > 0:
            extra.append(asyncio.create_task(self._offline(stop, self.opts.offline)))
        if self.opts.duration:
            extra.append(asyncio.create_task(_stop_after(stop, self.opts.duration)))
        try:
            await stop.wait()
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in extra:
                task.cancel()
            await asyncio.gather(*extra, return_exceptions=True)
            if out is not None:
                out.write("\n" + self.summary() + "\n")

    async def _offline(self, stop: asyncio.Event, offline: Offline) -> None:
        while not stop.is_set():
            await asyncio.sleep(offline.period)
            for agent in self.rng.sample(self.agents, round(len(self.agents) * offline.fraction)):
                agent.go_offline(offline.period)

    async def _summary(self, stop: asyncio.Event, out: TextIO) -> None:
        tty = out.isatty()
        while not stop.is_set():
            await asyncio.sleep(2)
            line = self.summary()
            out.write(("\r\x1b[K" + line) if tty else line + "\n")
            out.flush()

    def counts(self) -> dict[str, Any]:
        """Fleet figures: connected, state and version counts, telemetry, downloads."""
        states = Counter(
            pb.DeviceState.Name(a.state).removeprefix("DEVICE_STATE_").lower() for a in self.agents
        )
        versions = Counter(
            f"{a.running.installed.model}@{a.running.installed.version}"
            for a in self.agents
            if a.running
        )
        return {
            "devices": len(self.agents),
            "connected": sum(a.connected.is_set() for a in self.agents),
            "states": dict(states),
            "versions": dict(versions),
            "batches_sent": sum(a.stats["batches_sent"] for a in self.agents),
            "batches_acked": sum(a.stats["batches_acked"] for a in self.agents),
            "buffered": sum(len(a.buffer) for a in self.agents),
            "downloaded_bytes": sum(a.bytes_downloaded for a in self.agents),
        }

    def summary(self) -> str:
        """One line for the live view."""
        c = self.counts()
        versions = " ".join(f"{v}:{n}" for v, n in sorted(c["versions"].items())) or "-"
        states = " ".join(f"{k}:{v}" for k, v in sorted(c["states"].items()))
        return (
            f"[{time.monotonic() - self.started:6.0f}s] connected {c['connected']}/{c['devices']}"
            f" | {states} | running {versions} | batches {c['batches_acked']}/"
            f"{c['batches_sent']} acked, {c['buffered']} buffered"
            f" | downloaded {c['downloaded_bytes'] / 1e6:.1f} MB"
        )


async def _stop_after(stop: asyncio.Event, seconds: float) -> None:
    await asyncio.sleep(seconds)
    stop.set()


def api_token(environ: Mapping[str, str] | None = None) -> str:
    """``EDGELOOP_API_TOKEN``, else the token ``make up`` wrote to the state directory."""
    env = os.environ if environ is None else environ
    if env.get("EDGELOOP_API_TOKEN"):
        return env["EDGELOOP_API_TOKEN"]
    path = Path(env.get("EDGELOOP_STATE_DIR", ".edgeloop")) / "api-token"
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    return ""


async def simulate(opts: FleetOptions, out: TextIO | None = sys.stdout) -> Fleet:
    """Enrol and run the fleet until interrupted or ``opts.duration`` has passed."""
    import signal

    fleet = Fleet(opts)
    await asyncio.to_thread(fleet.prepare)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await fleet.run(stop, out)
    return fleet


def metrics_text(counts: dict[str, Any]) -> str:
    """The fleet's figures (:meth:`Fleet.counts`) in Prometheus's text format (written
    here: the edge package does without prometheus_client)."""

    def label(key: str, value: str) -> str:
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{{{key}="{escaped}"}}'

    # (name, type, help, [(labels, value)])
    families: list[tuple[str, str, str, list[tuple[str, Any]]]] = [
        ("edgeloop_fleet_devices", "gauge", "Simulated devices", [("", counts["devices"])]),
        ("edgeloop_fleet_connected", "gauge", "Devices connected", [("", counts["connected"])]),
        (
            "edgeloop_fleet_device_states",
            "gauge",
            "Devices by reported state",
            [(label("state", k), v) for k, v in sorted(counts["states"].items())],
        ),
        (
            "edgeloop_fleet_running",
            "gauge",
            "Devices by the model version they run",
            [(label("model_version", k), v) for k, v in sorted(counts["versions"].items())],
        ),
        (
            "edgeloop_fleet_batches_sent_total",
            "counter",
            "Telemetry batches sent",
            [("", counts["batches_sent"])],
        ),
        (
            "edgeloop_fleet_batches_acked_total",
            "counter",
            "Batches the gateway acknowledged",
            [("", counts["batches_acked"])],
        ),
        (
            "edgeloop_fleet_downloaded_bytes_total",
            "counter",
            "Artifact bytes downloaded",
            [("", counts["downloaded_bytes"])],
        ),
        (
            "edgeloop_fleet_buffered_batches",
            "gauge",
            "Batches buffered while offline",
            [("", counts["buffered"])],
        ),
    ]
    lines = []
    for name, kind, doc, samples in families:
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {value}" for labels, value in samples]
    return "\n".join(lines) + "\n"


async def _health(port: int, fleet: Fleet) -> asyncio.Server:
    """``/healthz``, ``/readyz`` (ready once a device is connected) and ``/metrics`` for
    ``make up``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            line = (await reader.readline()).decode("latin-1").split()
            path = line[1] if len(line) > 1 else "/"
            counts = fleet.counts()
            ok = path != "/readyz" or counts["connected"] > 0
            if path == "/metrics":
                ctype, body = "text/plain; version=0.0.4", metrics_text(counts).encode()
            else:
                ctype, body = "application/json", json.dumps(counts).encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", port)


def options_from_args(argv: list[str] | None = None) -> FleetOptions:
    """``python -m edgeloop.edge.fleet`` options; defaults from ``EDGELOOP_FLEET_*``."""
    import argparse

    env = os.environ
    parser = argparse.ArgumentParser(prog="edgeloop-fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=int(env.get("EDGELOOP_FLEET_DEVICES", "5")))
    parser.add_argument(
        "--label", action="append", default=None, help="k=v, for every device (repeat)"
    )
    parser.add_argument("--drift", default=env.get("EDGELOOP_FLEET_DRIFT"))
    parser.add_argument("--offline", default=env.get("EDGELOOP_FLEET_OFFLINE"))
    parser.add_argument("--slow", default=None)
    parser.add_argument("--corrupt", type=float, default=0.0)
    parser.add_argument("--prefix", default=env.get("EDGELOOP_FLEET_PREFIX", "sim"))
    parser.add_argument("--telemetry", default=env.get("EDGELOOP_FLEET_TELEMETRY", "10s"))
    parser.add_argument("--infer", default=env.get("EDGELOOP_FLEET_INFER", "1s"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--duration", default=None)
    parser.add_argument(
        "--gateway-api",
        default=env.get("EDGELOOP_FLEET_GATEWAY_API")
        or env.get("EDGELOOP_GATEWAY_API")
        or "http://127.0.0.1:18200",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(
            env.get("EDGELOOP_FLEET_STATE_DIR")
            or Path(env.get("EDGELOOP_STATE_DIR", ".edgeloop")) / "fleet"
        ),
    )
    args = parser.parse_args(argv)
    labels = {}
    given = args.label
    if given is None:  # EDGELOOP_FLEET_LABELS=k=v,k=v
        given = [x for x in env.get("EDGELOOP_FLEET_LABELS", "").split(",") if x.strip()]
    for item in given:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--label takes k=v, got {item!r}")
        labels[key] = value
    return FleetOptions(
        devices=args.devices,
        gateway_api=args.gateway_api,
        token=api_token(),
        state_dir=args.state_dir,
        prefix=args.prefix,
        labels=labels,
        drift=args.drift,
        offline=Offline.parse(args.offline) if args.offline else None,
        slow=Slow.parse(args.slow) if args.slow else None,
        corrupt=args.corrupt,
        telemetry_seconds=parse_duration(args.telemetry),
        infer_seconds=parse_duration(args.infer),
        infer_batch=args.batch,
        duration=parse_duration(args.duration) if args.duration else None,
    )


def main(argv: list[str] | None = None) -> None:
    """Run a simulated fleet (``make up`` runs a small one)."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    opts = options_from_args(argv)

    async def run() -> None:
        fleet = Fleet(opts)
        for attempt in range(60):  # the gateway may still be starting
            try:
                await asyncio.to_thread(fleet.prepare)
                break
            except (OSError, urllib.error.URLError) as exc:
                if attempt == 59:
                    raise
                print(f"waiting for the gateway API ({exc})", flush=True)
                await asyncio.sleep(2)
        port = os.environ.get("EDGELOOP_FLEET_HTTP_PORT")
        server = await _health(int(port), fleet) if port else None
        stop = asyncio.Event()
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await fleet.run(stop, sys.stdout)
        finally:
            if server is not None:
                server.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
