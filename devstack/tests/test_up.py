"""``make up`` / ``make down`` (``edgeloop.devstack.up`` / ``.down``) as subprocesses."""

from __future__ import annotations

import asyncio
import importlib.util
import json
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

from edgeloop.contracts.access import SERVICES as ACCESS
from edgeloop.contracts.stackfile import load_stack_json
from edgeloop.devstack.testing import up_environment
from edgeloop.devstack.up import SERVICES, running_pid

pytestmark = pytest.mark.slow


def _env(state: Path) -> dict[str, str]:
    return up_environment(state)


def _up(state: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    state.mkdir(parents=True, exist_ok=True)
    with (state / "up.out").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edgeloop.devstack.up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for_stack(proc: subprocess.Popen[bytes], state: Path) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while not (state / "stack.json").exists():
        assert proc.poll() is None, (state / "up.out").read_text()
        assert time.monotonic() < deadline, "stack.json did not appear"
        time.sleep(0.1)
    return load_stack_json(state / "stack.json")


def _leftovers(state: Path) -> list[str]:
    """Processes that belong to the stack in ``state``: started from it or with it as env."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        if p.info["pid"] == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(state) in cmdline or (p.info["environ"] or {}).get("EDGELOOP_STATE_DIR") == str(
            state
        ):
            found.append(f"{p.info['pid']} {cmdline}")
    return found


def _sql(dsn: str, query: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_up_writes_stack_json_keeps_data_and_stops_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = _env(state)
    proc = _up(state, env)
    try:
        stack = _wait_for_stack(proc, state)
        # the tools' URL is the admin's; each service has a user of its own
        admin = (state / "nats-users" / "admin").read_text().strip()
        port = env["EDGELOOP_NATS_PORT"]
        assert stack["nats_url"] == f"nats://admin:{admin}@127.0.0.1:{port}"
        # a user per service, the bootstrap (it declares the topology) and the admin
        assert len(list((state / "nats-users").iterdir())) == len(ACCESS) + 2
        assert admin not in (state / "nats" / "nats.conf").read_text()
        assert stack["registry_url"] == f"http://127.0.0.1:{env['EDGELOOP_OCI_REGISTRY_PORT']}"
        dsn = str(stack["database_url"])
        assert dsn == f"postgresql://postgres@127.0.0.1:{env['EDGELOOP_PG_PORT']}/edgeloop"
        assert running_pid(state) == proc.pid
        expected = [n for n, module in SERVICES if importlib.util.find_spec(module)]
        services = stack["services"]
        assert isinstance(services, dict)
        assert sorted(services) == sorted(expected)
        ports = {s["health_url"] for s in services.values()}
        assert len(ports) == len(expected)  # distinct ports

        _sql(dsn, "CREATE TABLE kept AS SELECT 7 AS x")

        if expected:  # a crashed service is restarted, and stack.json gets its new pid
            name = expected[0]
            old_pid = services[name]["pid"]
            os.kill(old_pid, signal.SIGKILL)
            deadline = time.monotonic() + 15
            while load_stack_json(state / "stack.json")["services"][name]["pid"] == old_pid:
                assert time.monotonic() < deadline, "the crashed service was not restarted"
                time.sleep(0.1)
            assert f"{name} exited with -9; restart in 1s" in (state / "up.out").read_text()

        # a second `make up` over the same state refuses to start
        again = subprocess.run(
            [sys.executable, "-m", "edgeloop.devstack.up"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert again.returncode != 0
        assert "already running" in again.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        out = (state / "up.out").read_text()
        assert "edgeloop is up" in out
        # the console's address, on its own port (`EDGELOOP_CONSOLE_PORT`, 18500 by default)
        console = f"http://127.0.0.1:{env['EDGELOOP_CONSOLE_PORT']}"
        assert f"console           {console}   (sign in" in out
        assert services["console"]["health_url"] == f"{console}/healthz"
        assert "edgeloop status" in out
        assert out.rstrip().endswith("stopped.")
        assert not (state / "stack.json").exists()
        assert not (state / "up.pid").exists()
        assert _leftovers(state) == []

        # again: PostgreSQL's data is kept; `make down` stops it
        proc = _up(state, env)
        stack = _wait_for_stack(proc, state)
        assert _sql(str(stack["database_url"]), "SELECT x FROM kept") == 7
        down = subprocess.run(
            [sys.executable, "-m", "edgeloop.devstack.down"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert "edgeloop stopped" in down.stdout
        assert proc.wait(10) == 0
        assert _leftovers(state) == []
        down = subprocess.run(
            [sys.executable, "-m", "edgeloop.devstack.down"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "not running" in down.stdout
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``make up`` so that it stops what it started: SIGTERM first (a SIGKILL would
    leave its services and servers running, orphaned, after a failed test)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


async def _stored(url: str, publish: bytes | None = None) -> int:
    """The messages of a test stream, after publishing ``publish`` to it."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream()
        if publish is not None:
            await js.add_stream(name="HEAL_TEST", subjects=["heal.test"])
            await js.publish("heal.test", publish)
        return (await js.stream_info("HEAL_TEST")).state.messages
    finally:
        await nc.close()


@pytest.mark.timeout(300)
def test_up_restarts_its_infrastructure_when_it_dies(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = _env(state) | {"EDGELOOP_FLEET_DEVICES": "1"}
    proc = _up(state, env)
    try:
        stack = _wait_for_stack(proc, state)
        infra = stack["infrastructure"]
        assert isinstance(infra, dict)
        assert sorted(infra) == ["nats", "oci-registry", "postgres", "prometheus"]
        assert all(s["restarts"] == 0 and s["state"] == "running" for s in infra.values())
        dsn = str(stack["database_url"])
        _sql(dsn, "CREATE TABLE kept AS SELECT 7 AS x")
        nats_url = str(stack["nats_url"])
        assert asyncio.run(_stored(nats_url, b"kept")) == 1
        assert isinstance(stack["services"], dict)
        services = {name: s["pid"] for name, s in stack["services"].items()}
        deadline = time.monotonic() + 120
        for svc in stack["services"].values():  # a running stack: every service ready
            while not _ready(svc["ready_url"]):
                assert time.monotonic() < deadline, f"{svc} never became ready"
                time.sleep(0.5)

        old = {name: int(infra[name]["pid"]) for name in ("postgres", "nats", "prometheus")}
        for pid in old.values():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            infra = load_stack_json(state / "stack.json").get("infrastructure", {})
            back = [
                name
                for name, pid in old.items()
                if infra[name]["state"] == "running" and infra[name]["pid"] != pid
            ]
            if len(back) == len(old):
                break
            assert time.monotonic() < deadline, (infra, (state / "up.out").read_text())
            time.sleep(0.1)

        for name, pid in old.items():
            assert infra[name]["restarts"] == 1
            assert infra[name]["last_exit"] == -signal.SIGKILL
            # reaped: no zombie of the old server is left
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != "zombie"
        assert infra["oci-registry"]["restarts"] == 0
        out = (state / "up.out").read_text()
        assert "postgres exited with -9; restart in 1s" in out
        assert "nats exited with -9; restart in 1s" in out
        assert "prometheus exited with -9; restart in 1s" in out
        # on the same port, with the same data
        assert _sql(dsn, "SELECT x FROM kept") == 7
        assert asyncio.run(_stored(nats_url)) == 1
        # the services were left running: they reconnect on their own
        now = load_stack_json(state / "stack.json")["services"]
        assert {name: s["pid"] for name, s in now.items()} == services

        status = subprocess.run(
            [str(Path(sys.executable).parent / "edgeloop"), "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        checks = {c["component"]: c for c in json.loads(status.stdout)["checks"]}
        for name in old:
            assert checks[name]["healthy"], checks[name]
            assert checks[name]["restarts"] == 1
            assert "restarts: 1 (last exit: SIGKILL)" in checks[name]["detail"]
        assert checks["oci-registry"]["restarts"] == 0

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert _leftovers(state) == []
    finally:
        _stop(proc)


@pytest.mark.timeout(300)
def test_up_runs_a_nats_cluster_and_two_replicas_of_every_service(tmp_path: Path) -> None:
    import nats

    from edgeloop.contracts import subjects as s
    from edgeloop.devstack.servers import http_ok

    state = tmp_path / "state"
    env = _env(state) | {"EDGELOOP_NATS_CLUSTER": "3", "EDGELOOP_SERVICE_REPLICAS": "2"}
    proc = _up(state, env)
    try:
        stack = _wait_for_stack(proc, state)
        platform = [n for n, module in SERVICES if n in ACCESS and importlib.util.find_spec(module)]
        deadline = time.monotonic() + 180
        while not {f"{n}-2" for n in platform} <= set(stack["services"]):  # type: ignore[arg-type]
            assert proc.poll() is None, (state / "up.out").read_text()
            assert time.monotonic() < deadline, f"replicas missing: {stack['services']}"
            time.sleep(0.5)
            stack = load_stack_json(state / "stack.json")
        services = stack["services"]
        assert isinstance(services, dict)
        assert sorted(p.name for p in (state / "nats-cluster").iterdir()) == ["n1", "n2", "n3"]
        for name, svc in services.items():  # every replica ready (PostgreSQL, NATS)
            while not http_ok(svc["ready_url"]):
                assert proc.poll() is None, (state / "up.out").read_text()
                assert time.monotonic() < deadline, f"{name} not ready: {svc['log']}"
                time.sleep(0.2)

        async def replicas() -> int | None:
            nc = await nats.connect(str(stack["nats_url"]))
            try:
                info = await nc.jetstream().stream_info(s.STREAM_LIFECYCLE)
                return info.config.num_replicas
            finally:
                await nc.close()

        assert asyncio.run(replicas()) == 3
        # Prometheus scrapes every replica (and NATS's figures from every node)
        config = json.loads((state / "prometheus" / "prometheus.yml").read_text().split("\n", 1)[1])
        scraped = {
            group["labels"]["service"]
            for job in config["scrape_configs"]
            for group in job["static_configs"]
        }
        assert scraped == (set(services) - {"traces"}) | {"prometheus"}
        assert {f"{n}-2" for n in platform} <= scraped
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert _leftovers(state) == []
    finally:
        _stop(proc)
