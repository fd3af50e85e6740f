"""The local servers and ``make up``'s supervisor, for real."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import nats
import psutil
import pytest

from edgeloop.devstack.servers import NatsServer, OciRegistry, Postgres, free_port


async def test_nats_keeps_jetstream_data_across_a_restart(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "n").start()
    try:
        nc = await nats.connect(server.url)
        await nc.jetstream().add_stream(name="KEEP", subjects=["keep.>"])
        await nc.jetstream().publish("keep.1", b"x")
        await nc.close()
        port = server.port
        server.restart(hard=True)
        assert server.port == port
        nc = await nats.connect(server.url)
        info = await nc.jetstream().stream_info("KEEP")
        assert info.state.messages == 1
        await nc.close()
        assert "sync_interval: always" in (tmp_path / "n" / "nats.conf").read_text()
    finally:
        server.stop()


async def test_postgres_keeps_tables_across_a_restart(tmp_path: Path) -> None:
    pg = Postgres(tmp_path / "p").start()
    try:
        dsn = await asyncio.to_thread(pg.create_database, "keep")
        conn = await asyncpg.connect(dsn)
        await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        await conn.close()
        await asyncio.to_thread(pg.restart)
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT x FROM t") == 42
        await conn.close()
    finally:
        pg.stop()


def test_registry_answers_v2_and_restarts(tmp_path: Path) -> None:
    import httpx

    reg = OciRegistry(tmp_path / "r").start()
    try:
        assert httpx.get(f"{reg.url}/v2/").status_code == 200
        reg.restart()
        assert httpx.get(f"{reg.url}/v2/").status_code == 200
    finally:
        reg.stop()


def test_a_crashing_server_reports_its_log(tmp_path: Path) -> None:
    busy = NatsServer(tmp_path / "a").start()
    try:
        clash = NatsServer(tmp_path / "b", port=busy.port)
        with pytest.raises(RuntimeError, match="nats exited"):
            clash.start(timeout=10)
    finally:
        busy.stop()


def _up(state: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgeloop.devstack.up"],
        env={
            **os.environ,
            "EDGELOOP_STATE_DIR": str(state),
            "EDGELOOP_NATS_PORT": str(free_port()),
            "EDGELOOP_NATS_MONITOR_PORT": str(free_port()),
            "EDGELOOP_PG_PORT": str(free_port()),
            "EDGELOOP_OCI_REGISTRY_PORT": str(free_port()),
            "EDGELOOP_FIRST_HTTP_PORT": str(free_port()),
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


@pytest.mark.slow
def test_up_writes_stack_json_and_stops_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = _up(state)
    try:
        _wait_for(state / "stack.json")
        stack = json.loads((state / "stack.json").read_text())
        assert stack["nats_url"].startswith("nats://127.0.0.1:")
        assert stack["database_url"].endswith("/edgeloop")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # nats-server, postgres, docker-registry
        # `make down`
        down = subprocess.run(
            [sys.executable, "-m", "edgeloop.devstack.down"],
            env={**os.environ, "EDGELOOP_STATE_DIR": str(state)},
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert proc.wait(30) == 0
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "edgeloop is up" in output
        assert "stopped." in output
        assert not (state / "stack.json").exists()
        assert not (state / "up.pid").exists()
        assert not [c for c in children if c.is_running() and c.status() != "zombie"]
        # A second `make up` keeps the data (PostgreSQL is not re-initialised).
        proc2 = _up(state)
        _wait_for(state / "stack.json")
        proc2.send_signal(signal.SIGINT)
        assert proc2.wait(60) == 0
        out2 = proc2.stdout.read().decode() if proc2.stdout else ""
        assert "edgeloop is up" in out2
    finally:
        for p in (proc,):
            if p.poll() is None:
                p.kill()
