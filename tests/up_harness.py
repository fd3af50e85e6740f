"""`make up` as a subprocess in a test, the demo run against it, and the check that the
loop's every effect exists exactly once (the crash-safety and cluster tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats

from edgeloop.devstack.testing import stream_messages, up_environment


def stack_of(state: Path) -> dict[str, Any]:
    """``stack.json`` as ``make up`` last wrote it."""
    return dict(json.loads((state / "stack.json").read_text()))


@contextlib.contextmanager
def running_up(tmp_path: Path, **env: str) -> Iterator[Path]:
    """``make up`` in ``tmp_path/up`` with ``env`` added, every service ready; its state
    directory. Stopped (SIGTERM) on exit."""
    state = tmp_path / "up"
    with (tmp_path / "up.out").open("wb") as up_log:
        up = subprocess.Popen(
            [sys.executable, "-m", "edgeloop.devstack.up"],
            env=up_environment(state) | env,
            stdout=up_log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not (state / "stack.json").exists() or not all(
            s["pid"] for s in stack_of(state)["services"].values()
        ):
            assert up.poll() is None, (tmp_path / "up.out").read_text()
            assert time.monotonic() < deadline, "make up did not start"
            time.sleep(0.5)
        for svc in stack_of(state)["services"].values():  # every service ready
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(svc["ready_url"], timeout=5).status_code == 200:
                        break
                assert time.monotonic() < deadline + 60, f"{svc} never became ready"
                time.sleep(0.5)
        yield state
    finally:
        up.terminate()
        up.wait(90)


def start_demo(state: Path, out: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``make demo`` against the stack in ``state``: its JSON summary goes to ``out``."""
    with log.open("wb") as demo_log:
        return subprocess.Popen(
            [sys.executable, "-m", "examples.demo", "--json", str(out), *args],
            env={**os.environ, "EDGELOOP_STATE_DIR": str(state)},
            stdout=demo_log,
            stderr=subprocess.STDOUT,
        )


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


def assert_each_effect_once(stack: dict[str, Any], model: str, told: str) -> None:
    """Every LIFECYCLE event unique by event id; two versions of ``model`` built,
    validated and rolled out, one alarm and retrain request each: every effect in the
    events and in the services' tables exactly once."""
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

    def rows(sql: str) -> list[asyncpg.Record]:
        return asyncio.run(_rows(dsn, sql, model))

    builds = rows("SELECT version FROM builder.builds WHERE model = $1")
    assert sorted(r["version"] for r in builds) == ["1", "2"]
    reports = rows("SELECT version FROM validator.reports WHERE model = $1")
    assert sorted(r["version"] for r in reports) == ["1", "2"]
    waves = rows(
        "SELECT w.rollout_id, w.wave, w.state FROM deployer.waves w "
        "JOIN deployer.rollouts r USING (rollout_id) WHERE r.model = $1"
    )
    assert {(str(r["rollout_id"]), r["wave"]) for r in waves} == set(started)
    assert {r["state"] for r in waves} == {"succeeded"}
    alarms = rows("SELECT alarm_id, retrain_request_id FROM monitor.alarms WHERE model = $1")
    assert {(str(r["alarm_id"]),) for r in alarms} == set(raised)
    assert {(str(r["retrain_request_id"]),) for r in alarms} == set(requested)
    versions = rows("SELECT version FROM registry.versions WHERE model = $1")
    assert sorted(r["version"] for r in versions) == ["1", "2"]
