"""Crash safety end to end: the whole loop (`make demo` against `make up`) while every
service is SIGKILLed once at a random moment and restarted by `make up`'s supervisor.
The loop completes; every LIFECYCLE event is unique by event id; every effect — build,
validation, wave, alarm, retrain request — exists exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest

from edgeloop.devstack.testing import stream_messages, up_environment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KILLED = ("registry", "builder", "validator", "deployer", "monitor", "gateway")


def _stack(state: Path) -> dict[str, Any]:
    return dict(json.loads((state / "stack.json").read_text()))


def _killer(state: Path, rng: random.Random, stop: threading.Event, log: list[str]) -> None:
    """Each service once, in a random order, at random moments 6 to 45 s into the story."""
    started = time.monotonic()
    order = list(KILLED)
    rng.shuffle(order)
    moments = sorted(rng.uniform(6, 45) for _ in order)
    for name, at in zip(order, moments, strict=True):
        while time.monotonic() - started < at:
            if stop.wait(0.1):
                return
        pid = _stack(state)["services"][name]["pid"]
        os.kill(pid, signal.SIGKILL)
        log.append(f"{time.monotonic() - started:5.1f} s: SIGKILL {name} (pid {pid})")


async def _lifecycle(nats_url: str) -> list[tuple[str, dict[str, Any]]]:
    nc = await nats.connect(nats_url)
    try:
        msgs = await stream_messages(nc.jetstream(), "LIFECYCLE", ">")
        return [(m.subject, json.loads(m.data)) for m in msgs]
    finally:
        await nc.close()


async def _rows(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def test_the_loop_survives_every_service_killed_once(tmp_path: Path) -> None:
    seed = int(os.environ.get("EDGELOOP_CRASH_SEED", time.time()))
    rng = random.Random(seed)
    state = tmp_path / "up"
    env = up_environment(state) | {
        "EDGELOOP_MONITOR_WINDOW_SECONDS": "3",
        "EDGELOOP_MONITOR_GRACE_SECONDS": "1",
    }
    with (tmp_path / "up.out").open("wb") as up_log:
        up = subprocess.Popen(
            [sys.executable, "-m", "edgeloop.devstack.up"],
            env=env,
            stdout=up_log,
            stderr=subprocess.STDOUT,
        )
    stop = threading.Event()
    kills: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while not (state / "stack.json").exists() or not all(
            s["pid"] for s in _stack(state)["services"].values()
        ):
            assert up.poll() is None, (tmp_path / "up.out").read_text()
            assert time.monotonic() < deadline, "make up did not start"
            time.sleep(0.5)
        for svc in _stack(state)["services"].values():  # every service ready
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(svc["ready_url"], timeout=5).status_code == 200:
                        break
                assert time.monotonic() < deadline + 60, f"{svc} never became ready"
                time.sleep(0.5)
        out = tmp_path / "demo.json"
        killer = threading.Thread(target=_killer, args=(state, rng, stop, kills))
        with (tmp_path / "demo.out").open("wb") as demo_log:
            demo = subprocess.Popen(
                [sys.executable, "-m", "examples.demo", "--devices", "20", "--bake", "4",
                 "--timeout", "180", "--json", str(out)],
                env={**os.environ, "EDGELOOP_STATE_DIR": str(state)},
                stdout=demo_log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            killer.start()
            code = demo.wait(600)
        killer.join(60)
        told = f"seed {seed}; kills: {kills}\n" + (tmp_path / "demo.out").read_text()[-4000:]
        assert code == 0, told
        assert len(kills) == len(KILLED), told
        stack = _stack(state)
        for name in KILLED:
            assert stack["services"][name]["restarts"] >= 1, (name, told)

        model = json.loads(out.read_text())["model"]
        events = asyncio.run(_lifecycle(stack["nats_url"]))
        ids = Counter(e["event_id"] for _, e in events)
        assert [i for i, n in ids.items() if n > 1] == [], told
        mine = [(subject, e) for subject, e in events if e.get("model") == model]

        def once(subject: str, *keys: str) -> Counter[tuple[Any, ...]]:
            seen = Counter(tuple(e.get(k) for k in keys) for s, e in mine if s == subject)
            assert seen, (subject, told)
            assert max(seen.values()) == 1, (subject, seen, told)
            return seen

        assert set(once("image.built", "version")) == {("1",), ("2",)}
        assert set(once("validation.passed", "version")) == {("1",), ("2",)}
        started = once("rollout.wave.started", "rollout_id", "wave")
        assert set(once("rollout.wave.succeeded", "rollout_id", "wave")) == set(started)
        assert len(once("rollout.completed", "rollout_id")) == 2
        raised = once("alarm.raised", "alarm_id")
        requested = once("retrain.requested", "request_id")

        dsn = stack["database_url"]
        builds = asyncio.run(
            _rows(dsn, "SELECT version FROM builder.builds WHERE model = $1", model)
        )
        assert sorted(r["version"] for r in builds) == ["1", "2"]
        reports = asyncio.run(
            _rows(dsn, "SELECT version FROM validator.reports WHERE model = $1", model)
        )
        assert sorted(r["version"] for r in reports) == ["1", "2"]
        waves = asyncio.run(
            _rows(
                dsn,
                "SELECT w.rollout_id, w.wave, w.state FROM deployer.waves w "
                "JOIN deployer.rollouts r USING (rollout_id) WHERE r.model = $1",
                model,
            )
        )
        assert {(str(r["rollout_id"]), r["wave"]) for r in waves} == set(started)
        assert {r["state"] for r in waves} == {"succeeded"}
        alarms = asyncio.run(
            _rows(
                dsn,
                "SELECT alarm_id, retrain_request_id FROM monitor.alarms WHERE model = $1",
                model,
            )
        )
        assert {(str(r["alarm_id"]),) for r in alarms} == set(raised)
        assert {(str(r["retrain_request_id"]),) for r in alarms} == set(requested)
        versions = asyncio.run(
            _rows(dsn, "SELECT version FROM registry.versions WHERE model = $1", model)
        )
        assert sorted(r["version"] for r in versions) == ["1", "2"]
    finally:
        stop.set()
        up.terminate()
        up.wait(90)
