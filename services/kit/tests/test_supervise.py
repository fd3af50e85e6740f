"""Supervised loops, without servers: restarts, death, outages, parts that die together."""

from __future__ import annotations

import asyncio

import pytest

from edgeloop.devstack.testing import eventually
from edgeloop.kit.supervise import Loops, together


async def test_a_failing_loop_is_restarted_and_recovers() -> None:
    loops = Loops(max_failures=5, first_backoff=0.01)
    calls = 0
    running = asyncio.Event()

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("boom")
        running.set()
        await asyncio.Event().wait()

    loops.spawn("flaky", flaky)
    try:
        await asyncio.wait_for(running.wait(), 5)
        assert loops.loops["flaky"].restarts == 2
        assert await loops.check() == (True, "")
    finally:
        await loops.stop()


async def test_a_loop_that_keeps_failing_is_dead_and_readiness_says_so() -> None:
    loops = Loops(max_failures=3, first_backoff=0.01)

    async def broken() -> None:
        raise RuntimeError("always")

    loops.spawn("broken", broken)
    try:
        await asyncio.wait_for(loops.dead.wait(), 5)
        ok, why = await loops.check()
        assert not ok
        assert "broken: dead after 3 failures in a row (RuntimeError: always)" in why
    finally:
        await loops.stop()


async def test_outages_never_make_a_loop_dead() -> None:
    loops = Loops(max_failures=2, first_backoff=0.01, max_backoff=0.01)

    async def waiting() -> None:
        raise ConnectionRefusedError("PostgreSQL is down")

    loops.spawn("waiting", waiting)
    try:
        await eventually(lambda: _restarted(loops, "waiting", 10), what="ten restarts")
        assert not loops.dead.is_set()
        assert (await loops.check())[0]
    finally:
        await loops.stop()


async def test_parts_run_together_die_together() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def dies() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("the API could not bind")

    with pytest.raises(ValueError, match="could not bind"):
        await together(forever(), dies())
    assert cancelled.is_set()


async def _restarted(loops: Loops, name: str, n: int) -> bool:
    return loops.loops[name].restarts >= n


async def test_stop_ends_a_loop_whose_cancellation_was_lost() -> None:
    """Before Python 3.12, ``asyncio.wait_for`` returns what it waited for when that
    arrived as the cancellation came, and the loop goes on: stopping cancels again."""
    loops = Loops()
    arrived: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.Event()
    rounds = 0

    async def consuming() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            what = arrived if rounds == 1 else asyncio.get_running_loop().create_future()
            waiting.set()
            await asyncio.wait_for(what, 3600)

    loops.spawn("consuming", consuming)
    await waiting.wait()
    arrived.set_result(1)  # what the loop waits for arrives just as it is stopped
    stopping = asyncio.ensure_future(loops.stop())
    done, _ = await asyncio.wait({stopping}, timeout=5)
    if not done:
        stopping.cancel()  # (cancelling the stop cancels the loop a second time)
        await asyncio.wait({stopping}, timeout=5)
    assert done, "the loop went on after its one cancellation was lost"
    assert rounds >= 1
