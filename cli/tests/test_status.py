"""``edgeloop status`` against the real servers."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeloop.cli.main import app
from edgeloop.devstack.servers import free_port
from edgeloop.kit.http import HealthServer

runner = CliRunner()


def _env(monkeypatch: pytest.MonkeyPatch, state: Path, **urls: str) -> None:
    monkeypatch.setenv("EDGELOOP_STATE_DIR", str(state))
    for key in ("EDGELOOP_NATS_URL", "EDGELOOP_DATABASE_URL", "EDGELOOP_OCI_REGISTRY_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in urls.items():
        monkeypatch.setenv(key, value)


def test_all_healthy_exits_zero(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    nats_url: str,
    pg_dsn: str,
    registry_url: str,
) -> None:
    _env(
        monkeypatch,
        tmp_path,
        EDGELOOP_NATS_URL=nats_url,
        EDGELOOP_DATABASE_URL=pg_dsn,
        EDGELOOP_OCI_REGISTRY_URL=registry_url,
    )
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["healthy"] is True
    assert {c["component"] for c in report["checks"]} == {"nats", "postgres", "oci-registry"}


def test_a_component_down_exits_one_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_dsn: str, registry_url: str
) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    _env(
        monkeypatch,
        tmp_path,
        EDGELOOP_NATS_URL=dead,
        EDGELOOP_DATABASE_URL=pg_dsn,
        EDGELOOP_OCI_REGISTRY_URL=registry_url,
    )
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 1
    line = next(ln for ln in result.output.splitlines() if " nats " in ln)
    assert "FAIL" in line
    assert "cannot connect" in line
    assert dead in line


async def _service(state: Path, name: str, port: int) -> None:
    (state / "stack.json").write_text(
        json.dumps(
            {"services": {name: {"health_url": f"http://127.0.0.1:{port}/healthz", "pid": 1}}}
        )
    )


def test_services_from_stack_json_are_checked(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    nats_url: str,
    pg_dsn: str,
    registry_url: str,
) -> None:
    import asyncio
    import threading

    ready = {"ok": True}

    async def check() -> tuple[bool, str]:
        return ready["ok"], "" if ready["ok"] else "database down"

    loop = asyncio.new_event_loop()
    server = HealthServer("127.0.0.1", 0, {"db": check})
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    refusing = free_port()
    try:
        (tmp_path / "stack.json").write_text(
            json.dumps(
                {
                    "services": {
                        "good": {"health_url": f"http://127.0.0.1:{server.port}/healthz"},
                    }
                }
            )
        )
        _env(
            monkeypatch,
            tmp_path,
            EDGELOOP_NATS_URL=nats_url,
            EDGELOOP_DATABASE_URL=pg_dsn,
            EDGELOOP_OCI_REGISTRY_URL=registry_url,
        )
        assert runner.invoke(app, ["status"]).exit_code == 0
        ready["ok"] = False  # not ready → unhealthy
        result = runner.invoke(app, ["status"])
        assert result.exit_code == 1
        assert "database down" in result.output
        (tmp_path / "stack.json").write_text(
            json.dumps(
                {
                    "services": {
                        "gone": {"health_url": f"http://127.0.0.1:{refusing}/healthz"},
                    }
                }
            )
        )
        result = runner.invoke(app, ["status"])
        assert result.exit_code == 1
        assert "not reachable" in result.output
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        with socket.socket():
            pass
