"""Helpers of the kit's tests: run the sample service as a real process, poll, read streams."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nats
from nats.js import JetStreamContext

SAMPLE_APP = Path(__file__).parent / "sample_app.py"


class SampleProcess:
    """The sample service in a subprocess, with its log kept for failure messages."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_path = log_dir / f"sample-{time.monotonic_ns()}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **extra: str) -> SampleProcess:
        env = {**os.environ, **self.env, **extra}
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(SAMPLE_APP)], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        return self

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "<no log>"


async def connect(url: str) -> tuple[nats.NATS, JetStreamContext]:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    return nc, nc.jetstream()


async def scrape(port: int, labels: str, name: str = "edgeloop_events_handled_total") -> float:
    """One sample of a Prometheus metric from a service's /metrics (0 when absent)."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=2) as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
