"""Supervised loops: every long-running task of a service restarts when it fails.

A loop (a partition consumer, the outbox relay, the deployer's engine, the monitor's
evaluation, a KV watch, a sweep, an API server) is expected to run until it is cancelled.
When it raises — or returns — the supervisor logs it and starts it again after a back-off
(0.5 s doubling to 30 s). A failure that looks like an outage of PostgreSQL or NATS does
not count toward the loop's death: the loop is waiting for its dependencies, and
``/readyz`` already says which one is down. Unexpected failures do count: after
``max_failures`` in a row (a run that lasted ``stable_after`` seconds resets the count)
the loop is *dead*: ``/readyz`` fails naming it, and :class:`Loops.dead` is set so a
process that runs under a supervisor (``Service.run``) can exit and be restarted whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from edgeloop.kit.faults import looks_like_outage

log = logging.getLogger(__name__)

RESTARTS = Counter("edgeloop_loop_restarts_total", "Supervised loop restarts", ["loop", "cause"])
DEAD = Gauge("edgeloop_loop_dead", "1 while a supervised loop is dead", ["loop"])

LoopFactory = Callable[[], Awaitable[None]]


@dataclass
class Loop:
    """One supervised loop's state."""

    name: str
    factory: LoopFactory
    failures: int = 0
    """Unexpected failures in a row (outages not counted)."""
    restarts: int = 0
    streak: int = 0
    """Restarts in a row, whatever the cause (the back-off grows with it)."""
    last_error: str = ""
    started_at: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    dead_since: float | None = None

    def describe(self) -> str:
        return f"{self.name}: dead after {self.failures} failures in a row ({self.last_error})"


async def together(*coros: Coroutine[Any, Any, object]) -> None:
    """Run ``coros`` until the first of them ends; then cancel the others and re-raise
    what ended it. One supervised loop made of parts (an engine and its API): a part that
    dies takes the whole down, and the supervisor restarts it whole."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        finished = ", ".join(t.get_coro().__qualname__ for t in done)  # type: ignore[union-attr]
        raise RuntimeError(f"{finished} returned; the others are stopped with it")
    finally:
        await cancel_and_wait(tasks)


async def cancel_and_wait(tasks: list[asyncio.Task[Any]], *, again_after: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until each has ended (whatever it raised).

    A cancellation can be lost: before Python 3.12, ``asyncio.wait_for`` returns what it
    waited for when that finished as the cancellation came (nats-py's ``next_msg``, under
    load), and the task goes on with its loop. A task still running ``again_after``
    seconds after a cancellation is cancelled again (a monitor's shutdown waited for ever
    on a partition consumer that had lost its one cancellation).
    """
    for task in tasks:
        task.cancel()
    for task in tasks:
        while not task.done():
            await asyncio.wait({task}, timeout=again_after)
            if not task.done():
                task.cancel()
        if not task.cancelled():
            task.exception()  # retrieved: what ended it is not this caller's to raise


class Loops:
    """The supervised loops of one process."""

    def __init__(
        self,
        *,
        max_failures: int = 5,
        stable_after: float = 30.0,
        max_backoff: float = 30.0,
        first_backoff: float = 0.5,
    ) -> None:
        self.max_failures = max_failures
        self.stable_after = stable_after
        self.max_backoff = max_backoff
        self.first_backoff = first_backoff
        self.loops: dict[str, Loop] = {}
        self.dead = asyncio.Event()
        """Set when a loop has died (stays set until it runs stably again)."""

    def spawn(self, name: str, factory: LoopFactory) -> asyncio.Task[None]:
        """Run ``factory()`` supervised under ``name`` (unique in this process)."""
        old = self.loops.get(name)
        if old is not None and old.task is not None and not old.task.done():
            raise RuntimeError(f"a loop named {name!r} is already running")
        loop = Loop(name, factory)
        self.loops[name] = loop
        loop.task = asyncio.create_task(self._supervise(loop), name=f"supervised-{name}")
        return loop.task

    def forget(self, name: str) -> None:
        """Drop ``name`` from the loops looked at (its task was cancelled by its owner)."""
        loop = self.loops.pop(name, None)
        if loop is not None and loop.dead_since is not None:
            DEAD.labels(loop.name).set(0)
        if not self.dead_loops():
            self.dead.clear()

    def is_dead(self, name: str) -> bool:
        """Whether the loop ``name`` is dead (failed ``max_failures`` times in a row)."""
        loop = self.loops.get(name)
        return loop is not None and loop.dead_since is not None

    async def stop(self) -> None:
        """Cancel every loop and wait for them."""
        await cancel_and_wait([lp.task for lp in self.loops.values() if lp.task is not None])
        self.loops.clear()
        self.dead.clear()

    def dead_loops(self) -> list[Loop]:
        """Loops that failed ``max_failures`` times in a row and have not recovered."""
        return [lp for lp in self.loops.values() if lp.dead_since is not None]

    async def check(self) -> tuple[bool, str]:
        """Readiness: no loop is dead."""
        dead = self.dead_loops()
        if dead:
            return False, "; ".join(lp.describe() for lp in dead)
        return True, ""

    async def _supervise(self, loop: Loop) -> None:
        while True:
            loop.started_at = time.monotonic()
            cause = "returned"
            try:
                await loop.factory()
                loop.last_error = "returned"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                loop.last_error = f"{type(exc).__name__}: {exc}"[:500]
                cause = "outage" if looks_like_outage(exc) else "error"
                if cause == "error":
                    log.exception("loop %s failed", loop.name)
            ran = time.monotonic() - loop.started_at
            if ran >= self.stable_after:
                loop.failures = loop.streak = 0
                self._revive(loop)
            if cause == "outage":
                log.warning("loop %s stopped on an outage (%s)", loop.name, loop.last_error)
            else:
                loop.failures += 1
                if loop.failures >= self.max_failures and loop.dead_since is None:
                    loop.dead_since = time.monotonic()
                    DEAD.labels(loop.name).set(1)
                    self.dead.set()
                    log.error("loop %s is dead: %s", loop.name, loop.describe())
            loop.restarts += 1
            loop.streak += 1
            RESTARTS.labels(loop.name, cause).inc()
            delay = min(self.first_backoff * 2 ** (loop.streak - 1), self.max_backoff)
            log.warning("loop %s restarts in %.1f s (restart %d)", loop.name, delay, loop.restarts)
            await asyncio.sleep(delay)
            # a dead loop that now runs for stable_after is alive again
            asyncio.get_running_loop().call_later(
                self.stable_after, self._maybe_revive, loop, loop.restarts
            )

    def _maybe_revive(self, loop: Loop, restarts: int) -> None:
        if loop.restarts == restarts and loop.task is not None and not loop.task.done():
            loop.failures = loop.streak = 0
            self._revive(loop)

    def _revive(self, loop: Loop) -> None:
        if loop.dead_since is not None:
            loop.dead_since = None
            DEAD.labels(loop.name).set(0)
            log.info("loop %s runs again", loop.name)
        if not self.dead_loops():
            self.dead.clear()
