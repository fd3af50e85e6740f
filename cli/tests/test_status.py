"""``edgeloop status`` against real servers (NATS, PostgreSQL, OCI registry, a service's
health endpoint), healthy and broken."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from edgeloop.cli.config import load_endpoints, ready_url_for
from edgeloop.cli.main import app
from edgeloop.contracts.stackfile import redact
from edgeloop.devstack.prometheus import Prometheus
from edgeloop.devstack.servers import NatsServer, free_port
from edgeloop.kit.http import HealthServer

runner = CliRunner()
ENV_KEYS = ("EDGELOOP_NATS_URL", "EDGELOOP_DATABASE_URL", "EDGELOOP_OCI_REGISTRY_URL")


@dataclass
class Stack:
    """The CLI's view of a stack: a state dir and the environment."""

    state: Path
    monkeypatch: pytest.MonkeyPatch

    def env(self, **values: str) -> None:
        for key, value in values.items():
            self.monkeypatch.setenv(key, value)

    def write(self, **stack: Any) -> None:
        (self.state / "stack.json").write_text(json.dumps(stack))

    def status(self, *args: str) -> Result:
        return runner.invoke(app, ["status", *args])

    def report(self) -> tuple[int, dict[str, dict[str, Any]]]:
        result = self.status("--json")
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        checks = {c["component"]: c for c in json.loads(result.output)["checks"]}
        return result.exit_code, checks


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Stack:
    """No endpoints from the developer's environment or ``make up`` leak in."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("EDGELOOP_STATE_DIR", str(tmp_path))
    return Stack(tmp_path, monkeypatch)


@pytest.fixture
def healthy(stack: Stack, nats_url: str, pg_dsn: str, registry_url: str) -> Stack:
    stack.env(
        EDGELOOP_NATS_URL=nats_url,
        EDGELOOP_DATABASE_URL=pg_dsn,
        EDGELOOP_OCI_REGISTRY_URL=registry_url,
    )
    return stack


def _line(output: str, component: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.split()[:1] == [component]]
    assert len(lines) == 1, output
    return lines[0]


# --- infrastructure -------------------------------------------------------------------


def test_all_healthy_exits_zero(healthy: Stack) -> None:
    code, checks = healthy.report()
    assert code == 0, checks
    assert set(checks) == {"nats", "postgres", "oci-registry"}
    assert all(c["healthy"] and c["status"] == "ok" for c in checks.values())
    assert re.fullmatch(
        r"nats-server \d+\.\d+\.\d+, JetStream: \d+ streams, \d+ consumers",
        checks["nats"]["detail"],
    )
    assert checks["postgres"]["detail"].startswith("PostgreSQL ")
    assert checks["oci-registry"]["endpoint"].endswith("/v2/")


def test_the_table_has_a_line_per_component(healthy: Stack) -> None:
    result = healthy.status()
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == ["COMPONENT", "ENDPOINT", "STATUS", "DETAIL"]
    for component in ("nats", "postgres", "oci-registry"):
        assert _line(result.output, component).split()[2] == "ok"
    assert "all 3 healthy" in result.output


@pytest.mark.parametrize(
    ("component", "key", "label", "dead"),
    [
        ("nats", "EDGELOOP_NATS_URL", "NATS", "nats://127.0.0.1:{port}"),
        ("postgres", "EDGELOOP_DATABASE_URL", "PostgreSQL", "postgresql://u@127.0.0.1:{port}/db"),
        ("oci-registry", "EDGELOOP_OCI_REGISTRY_URL", "OCI registry", "http://127.0.0.1:{port}"),
    ],
)
def test_a_component_down_exits_one_and_its_line_says_why(
    healthy: Stack, component: str, key: str, label: str, dead: str
) -> None:
    url = dead.format(port=free_port())
    healthy.env(**{key: url})
    result = healthy.status()
    assert result.exit_code == 1, result.output
    line = _line(result.output, component)
    assert line.split()[2] == "FAIL"
    shown = url + "/v2/" if component == "oci-registry" else url
    assert f"{label} at {shown}: connection refused" in line
    for other in {"nats", "postgres", "oci-registry"} - {component}:
        assert _line(result.output, other).split()[2] == "ok"
    assert "1 of 3 unhealthy" in result.output


def test_a_password_is_never_printed(healthy: Stack) -> None:
    healthy.env(EDGELOOP_DATABASE_URL=f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db")
    for args in ((), ("--json",)):
        result = healthy.status(*args)
        assert result.exit_code == 1
        assert "hunter2" not in result.output
        assert "postgresql://u:***@" in result.output


def test_a_missing_database_is_named(healthy: Stack, pg_dsn: str) -> None:
    healthy.env(EDGELOOP_DATABASE_URL=pg_dsn.rsplit("/", 1)[0] + "/no_such_db")
    code, checks = healthy.report()
    assert code == 1
    assert 'database "no_such_db" does not exist' in checks["postgres"]["detail"]


@pytest.fixture(scope="module")
def nats_without_jetstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    class PlainNats(NatsServer):
        def prepare(self) -> None:
            (self.data_dir / "nats.conf").write_text(
                f"listen: 127.0.0.1:{self.port}\nhttp: 127.0.0.1:{self.monitor_port}\n"
            )

        def ready(self) -> bool:
            import urllib.request

            try:
                with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

    server = PlainNats(tmp_path_factory.mktemp("plain-nats")).start()
    yield server.url
    server.stop()


def test_nats_without_jetstream_is_unhealthy(healthy: Stack, nats_without_jetstream: str) -> None:
    healthy.env(EDGELOOP_NATS_URL=nats_without_jetstream)
    code, checks = healthy.report()
    assert code == 1
    assert checks["nats"]["detail"] == (
        f"NATS at {nats_without_jetstream}: JetStream is not enabled on the server"
    )


def test_a_port_that_does_not_speak_nats_times_out(healthy: Stack, registry_url: str) -> None:
    url = registry_url.replace("http://", "nats://")
    healthy.env(EDGELOOP_NATS_URL=url)
    code, checks = healthy.report()
    assert code == 1
    assert checks["nats"]["detail"] == f"NATS at {url}: no answer within 2 s"


def test_without_endpoints_it_says_where_they_come_from(stack: Stack) -> None:
    code, checks = stack.report()
    assert code == 1
    assert checks["nats"]["detail"] == (
        "NATS: no endpoint (set EDGELOOP_NATS_URL or run `make up`)"
    )
    assert "EDGELOOP_DATABASE_URL" in checks["postgres"]["detail"]
    assert "EDGELOOP_OCI_REGISTRY_URL" in checks["oci-registry"]["detail"]


def test_stack_json_gives_endpoints_and_the_environment_overrides_it(
    stack: Stack, nats_url: str, pg_dsn: str, registry_url: str
) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    stack.write(nats_url=dead, database_url=pg_dsn, registry_url=registry_url, services={})
    code, checks = stack.report()
    assert code == 1
    assert checks["nats"]["endpoint"] == dead
    assert checks["postgres"]["healthy"]
    stack.env(EDGELOOP_NATS_URL=nats_url)
    code, checks = stack.report()
    assert code == 0, checks


# --- services -----------------------------------------------------------------------------


class Service:
    """A real kit health server (as every service runs) on its own event loop thread."""

    def __init__(self) -> None:
        self.ready = True
        self.loop = asyncio.new_event_loop()
        self.server = HealthServer("127.0.0.1", 0, {"db": self._db})
        self.loop.run_until_complete(self.server.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _db(self) -> tuple[bool, str]:
        return self.ready, "" if self.ready else "database down"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/healthz"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def service() -> Iterator[Service]:
    svc = Service()
    yield svc
    svc.close()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_services_from_stack_json_are_checked(healthy: Stack, service: Service) -> None:
    refusing = f"http://127.0.0.1:{free_port()}/healthz"
    gone = _dead_pid()
    healthy.write(
        services={
            "builder": {"health_url": service.health_url, "pid": 1},
            "validator": {"health_url": refusing, "pid": gone},
        }
    )
    result = healthy.status()
    assert result.exit_code == 1, result.output
    assert _line(result.output, "builder").split()[2] == "ok"
    line = _line(result.output, "validator")
    assert line.split()[2] == "FAIL"
    assert f"service validator at {refusing}: connection refused" in line
    assert f"(process {gone} is not running)" in line

    healthy.write(services={"builder": {"health_url": service.health_url}})
    assert healthy.status().exit_code == 0


def test_a_service_alive_but_not_ready_is_unhealthy(healthy: Stack, service: Service) -> None:
    healthy.write(services={"registry": {"health_url": service.health_url, "pid": 1}})
    service.ready = False
    code, checks = healthy.report()
    assert code == 1
    detail = checks["registry"]["detail"]
    assert detail.startswith(f"service registry at {ready_url_for(service.health_url)}: HTTP 503")
    assert "db: failing: database down" in detail
    service.ready = True
    assert healthy.report()[0] == 0


def test_a_service_without_health_url_is_reported(healthy: Stack) -> None:
    healthy.write(services={"odd": {"pid": 1}})
    code, checks = healthy.report()
    assert code == 1
    assert checks["odd"]["detail"] == "service odd: stack.json gives no health_url"


def test_the_restarts_make_up_recorded_are_shown(
    stack: Stack, nats_url: str, pg_dsn: str, service: Service
) -> None:
    dead_registry = f"http://127.0.0.1:{free_port()}"
    stack.write(
        nats_url=nats_url,
        database_url=pg_dsn,
        registry_url=dead_registry,
        infrastructure={
            "nats": {"pid": 5, "state": "running", "restarts": 0, "last_exit": None},
            "postgres": {"pid": 6, "state": "running", "restarts": 2, "last_exit": -9},
            "oci-registry": {"pid": None, "state": "restarting", "restarts": 1, "last_exit": 2},
        },
        services={
            "builder": {"health_url": service.health_url, "pid": 1, "restarts": 1, "last_exit": 1}
        },
    )
    code, checks = stack.report()
    assert code == 1
    assert checks["nats"]["restarts"] == 0
    assert "restarts" not in checks["nats"]["detail"]
    assert checks["postgres"]["healthy"]
    assert (checks["postgres"]["restarts"], checks["postgres"]["last_exit"]) == (2, -9)
    assert checks["postgres"]["detail"].endswith("; restarts: 2 (last exit: SIGKILL)")
    assert checks["oci-registry"]["detail"].endswith(
        "connection refused; restarts: 1 (last exit: status 2); make up is restarting it"
    )
    assert checks["builder"]["detail"] == "alive and ready; restarts: 1 (last exit: status 1)"
    assert "restarts: 2 (last exit: SIGKILL)" in _line(stack.status().output, "postgres")

    # a server the environment points elsewhere is not the one make up restarted
    stack.env(EDGELOOP_DATABASE_URL=pg_dsn)
    code, checks = stack.report()
    assert checks["postgres"]["restarts"] is None
    assert "restarts" not in checks["postgres"]["detail"]


@pytest.mark.skipif(
    not Path(Prometheus.binary).exists(),
    reason=f"{Prometheus.binary} not installed (`make setup` installs Debian's prometheus)",
)
def test_make_ups_prometheus_is_checked_like_a_service(healthy: Stack, tmp_path: Path) -> None:
    prometheus = Prometheus(tmp_path / "prometheus", targets=[]).start()
    try:
        entry = {"pid": prometheus.pid, "state": "running", "restarts": 1, "last_exit": -9}
        healthy.write(infrastructure={"prometheus": entry | prometheus.status_urls()})
        code, checks = healthy.report()
        assert code == 0, checks
        assert checks["prometheus"]["endpoint"] == f"{prometheus.url}/-/healthy"
        assert checks["prometheus"]["detail"] == "alive and ready; restarts: 1 (last exit: SIGKILL)"
    finally:
        prometheus.stop()
    code, checks = healthy.report()
    assert code == 1
    assert "connection refused" in checks["prometheus"]["detail"]


# --- endpoint resolution ------------------------------------------------------------------


def test_load_endpoints_reads_the_state_dir(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text(
        json.dumps(
            {
                "nats_url": "nats://file:4222",
                "services": {"b": {"health_url": "http://h:1/healthz", "pid": 7}, "a": {}},
            }
        )
    )
    ep = load_endpoints({"EDGELOOP_STATE_DIR": str(tmp_path), "EDGELOOP_NATS_URL": "nats://env"})
    assert ep.nats_url == "nats://env"
    assert ep.database_url is None
    assert [s.name for s in ep.services] == ["a", "b"]
    assert ep.services[1].ready_url == "http://h:1/readyz"
    assert ep.services[1].pid == 7
    assert ep.stack_file == tmp_path / "stack.json"


def test_ready_url_and_redaction() -> None:
    assert ready_url_for("http://127.0.0.1:9/healthz") == "http://127.0.0.1:9/readyz"
    assert ready_url_for("http://127.0.0.1:9/svc/healthz/") == "http://127.0.0.1:9/svc/readyz"
    assert ready_url_for("http://127.0.0.1:9") == "http://127.0.0.1:9/readyz"
    assert redact("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("nats://token@h:4222") == "nats://***@h:4222"
    assert redact("nats://h:4222") == "nats://h:4222"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"  # a user name is no secret
    assert redact("postgresql://u:@h/db") == "postgresql://u:***@h/db"
