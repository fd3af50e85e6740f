"""The local servers, for real: they start, answer, restart on the same port, keep data."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import nats
import psutil
import pytest

from edgeloop.devstack.servers import (
    PG_USER,
    NatsServer,
    OciRegistry,
    Postgres,
    Stack,
    free_port,
)


def test_free_port_never_hands_out_a_port_twice() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50


async def test_nats_keeps_jetstream_data_and_clients_reconnect_across_restarts(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path / "n").start()
    try:
        conf = server.config_path.read_text()
        assert "sync_interval: always" in conf
        assert "max_payload: 8MB" in conf
        assert server.url == f"nats://127.0.0.1:{server.port}"
        async with httpx.AsyncClient() as http:
            health = await http.get(f"{server.monitor_url}/healthz?js-enabled-only=true")
        assert health.status_code == 200
        reconnected = asyncio.Event()

        async def on_reconnect() -> None:
            reconnected.set()

        nc = await nats.connect(
            server.url,
            reconnect_time_wait=0.1,
            max_reconnect_attempts=-1,
            reconnected_cb=on_reconnect,
        )
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.1", b"x")
        url = server.url
        for hard in (True, False):
            reconnected.clear()
            server.restart(hard=hard)
            assert server.url == url
            # the same connection reconnects to the same URL and sees the stored data
            await asyncio.wait_for(reconnected.wait(), 10)
            await js.publish("keep.2", b"y")
        info = await js.stream_info("KEEP")
        assert info.state.messages == 3
        assert nc.stats["reconnects"] >= 2
        await nc.close()
    finally:
        server.stop()
    assert not server.running


async def test_postgres_keeps_tables_across_graceful_and_hard_restarts(tmp_path: Path) -> None:
    pg = Postgres(tmp_path / "p").start()
    try:
        assert pg.can_restart
        if os.geteuid() == 0:  # PostgreSQL refuses root: it runs unprivileged
            assert psutil.Process(pg.pid).username() == PG_USER
        dsn = await pg.create_database_async("keep")
        assert dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/keep"
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SHOW fsync") == "on"
        await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        await conn.close()
        for hard in (False, True):
            pg.restart(hard=hard)
            conn = await asyncpg.connect(dsn)
            assert await conn.fetchval("SELECT x FROM t") == 42
            await conn.close()
        # a second create_database of an existing database keeps it
        assert pg.create_database("keep") == dsn
    finally:
        pg.stop()
    assert not pg.running
    assert not (tmp_path / "p" / "pgdata" / "postmaster.pid").exists()


async def _fetch(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


@pytest.mark.parametrize("left_behind", ["a zombie", "a reused pid"])
def test_postgres_starts_over_the_postmaster_pid_of_a_sigkilled_postmaster(
    tmp_path: Path, left_behind: str
) -> None:
    first = Postgres(tmp_path / "p").start()
    lock = tmp_path / "p" / "pgdata" / "postmaster.pid"
    squatter: subprocess.Popen[bytes] | None = None
    try:
        dsn = first.create_database("kept")
        asyncio.run(_fetch(dsn, "CREATE TABLE t AS SELECT 42 AS x"))
        # the pid file of a live postmaster is never taken away
        with pytest.raises(RuntimeError, match=r"lock file \"postmaster\.pid\" already exists"):
            Postgres(tmp_path / "p").start(timeout=20)
        assert lock.exists()
        assert first.running

        pid = first.pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)  # postmaster and backends, with no clean-up
        if left_behind == "a zombie":  # nobody reaps the postmaster
            deadline = time.monotonic() + 10
            while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline, "the SIGKILLed postmaster still runs"
                time.sleep(0.05)
        else:  # reaped, and its pid now names another program of the server's user
            assert first.proc is not None
            first.proc.wait()
            as_user = {"user": PG_USER, "group": PG_USER} if os.geteuid() == 0 else {}
            squatter = subprocess.Popen(["sleep", "60"], **as_user)  # type: ignore[call-overload]
            lines = lock.read_text().splitlines()
            lock.write_text("\n".join([str(squatter.pid), *lines[1:]]) + "\n")
        assert lock.exists()

        again = Postgres(tmp_path / "p", port=first.port).start()
        try:
            assert not lock.exists() or int(lock.read_text().split()[0]) == again.pid
            # the same data: the table made before the crash is there
            assert asyncio.run(_fetch(again.dsn("kept"), "SELECT x FROM t")) == 42
        finally:
            again.stop()
    finally:
        first.kill()
        if first.proc is not None and first.proc.returncode is None:
            first.proc.wait()
        if squatter is not None:
            squatter.kill()
            squatter.wait()


async def test_an_existing_postgres_is_used_but_never_restarted(postgres: Postgres) -> None:
    ext = Postgres.existing(postgres.dsn("postgres") + "?application_name=t")
    assert not ext.can_restart
    assert ext.port == postgres.port
    assert (
        ext.dsn("other")
        == f"postgresql://postgres@127.0.0.1:{postgres.port}/other?application_name=t"
    )
    with pytest.raises(RuntimeError, match="cannot be restarted"):
        ext.restart()
    ext.start()  # nothing to start
    dsn = ext.create_database("existing_db_test")
    conn = await asyncpg.connect(dsn)
    assert await conn.fetchval("SELECT current_database()") == "existing_db_test"
    await conn.close()
    ext.stop()  # not ours: a no-op
    await ext.drop_database_async("existing_db_test")
    assert postgres.running


def test_an_unreachable_database_url_falls_back_to_embedded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    with pytest.warns(RuntimeWarning, match="DATABASE_URL"):
        pg = Postgres.from_env(tmp_path)
    assert pg.can_restart


def _push_blob(url: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = httpx.post(f"{url}/v2/{repo}/blobs/uploads/")
    assert start.status_code == 202, start.text
    location = httpx.URL(url).join(start.headers["location"])
    # the location carries the upload's state in its query: add to it, do not replace it
    done = httpx.put(location.copy_merge_params({"digest": digest}), content=data)
    assert done.status_code == 201, done.text
    return digest


def test_registry_answers_v2_and_keeps_blobs_across_a_restart(tmp_path: Path) -> None:
    reg = OciRegistry(tmp_path / "r").start()
    try:
        assert reg.host == f"127.0.0.1:{reg.port}"
        assert httpx.get(f"{reg.url}/v2/").status_code == 200
        digest = _push_blob(reg.url, "devstack/test", b"layer bytes")
        reg.restart(hard=True)
        assert httpx.head(f"{reg.url}/v2/devstack/test/blobs/{digest}").status_code == 200
    finally:
        reg.stop()


def test_a_missing_registry_binary_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OciRegistry, "binary", str(tmp_path / "no-such-registry"))
    with pytest.raises(RuntimeError, match="apt-get install docker-registry"):
        OciRegistry(tmp_path / "r").start()


def test_a_crashing_server_reports_its_log(tmp_path: Path) -> None:
    busy = NatsServer(tmp_path / "a").start()
    try:
        clash = NatsServer(tmp_path / "b", port=busy.port)
        with pytest.raises(RuntimeError, match="nats exited") as err:
            clash.start(timeout=10)
        assert "address already in use" in str(err.value)
    finally:
        busy.stop()


def test_stack_starts_and_stops_all_three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    stack = Stack.in_dir(tmp_path).start_all()
    try:
        assert stack.nats.running
        assert stack.postgres.running
        assert stack.registry.running
        assert (tmp_path / "nats" / "nats.log").exists()
        assert (tmp_path / "pg" / "postgres.log").exists()
    finally:
        stack.stop_all()
    assert not stack.nats.running
    assert not stack.postgres.running
    assert not stack.registry.running


def test_servers_left_running_are_killed_at_interpreter_exit(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path\n"
        "from edgeloop.devstack.servers import NatsServer, OciRegistry\n"
        "n = NatsServer(Path(sys.argv[1]) / 'n').start()\n"
        "print(n.pid, OciRegistry(Path(sys.argv[1]) / 'r').start().pid)\n"
        "del n  # even an object that is gone leaves no server behind\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for pid in map(int, out.stdout.split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_session_fixtures_are_real_servers(
    nats_url: str, pg_dsn: str, registry_url: str, unique: str
) -> None:
    assert nats_url.startswith("nats://127.0.0.1:")
    assert pg_dsn.startswith("postgresql://")
    assert httpx.get(f"{registry_url}/v2/").status_code == 200
    assert len(unique) == 10
    int(unique, 16)
