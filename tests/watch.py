"""Watching a service process while a test attacks it: readiness, memory, its log."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import httpx
import psutil

from edgeloop.devstack.up import ServiceProcess


async def ready(client: httpx.AsyncClient, url: str) -> bool:
    """Whether ``/readyz`` at ``url`` answers 200."""
    try:
        return (await client.get(url, timeout=5)).status_code == 200
    except httpx.TransportError:
        return False


class PeakRss:
    """The peak RSS of a process while in the ``with`` block, sampled every 5 ms, and
    the kernel's high-water mark (reset at the start)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        with contextlib.suppress(OSError):  # reset VmHWM (Linux; same user)
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        self.base = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, ValueError, StopIteration):
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
            self.peak = max(self.peak, int(hwm.split()[1]) * 1024)

    @property
    def growth(self) -> int:
        return self.peak - self.base

    def now(self) -> int:
        """The RSS at this moment."""
        return int(self.proc.memory_info().rss)


def tracebacks(log: Path, *, since: int = 0) -> list[str]:
    """The tracebacks a service logged after byte ``since`` of its log (each as text)."""
    text = log.read_bytes()[since:].decode(errors="replace")
    return ["Traceback" + part.split("\n\n")[0][:3000] for part in text.split("Traceback")[1:]]


class Readiness:
    """Polls a service's ``/readyz`` (and that its process lives) every half second."""

    def __init__(self, proc: ServiceProcess) -> None:
        self.proc = proc
        self.checks = 0
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                self.checks += 1
                if not self.proc.running:
                    self.failures.append(f"{time.monotonic():.1f}: exited {self.proc.poll()}")
                elif not await ready(client, self.proc.ready_url):
                    self.failures.append(f"{time.monotonic():.1f}: not ready")
                await asyncio.sleep(0.5)

    async def __aenter__(self) -> Readiness:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
