"""Prometheus with ``make up``: Debian's prometheus scrapes every service (the gateway
and the fleet included) and NATS, and the alert rules shipped in ``deploy/prometheus/``
fire on what they watch. One ``make up`` for the module (1 s scrape and evaluation);
``promtool`` checks the shipped configuration and runs the rules' unit tests."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeloop.devstack.prometheus import ALERTS, DEPLOY_DIR, Target, scrape_config
from edgeloop.devstack.testing import eventually
from tests.deploy_harness import register_version
from tests.modelzoo import classifier
from tests.up_harness import running_up, stack_of

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (`make setup` installs Debian's prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    not Path("/usr/bin/prometheus").exists(),
    reason="/usr/bin/prometheus not installed (`make setup` installs Debian's prometheus)",
)


def promtool(*args: str, cwd: Path | None = None) -> str:
    """``promtool ARGS``; its output (the test fails with it when promtool does)."""
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_promtool
def test_the_shipped_compose_configuration_and_rules_pass_promtool() -> None:
    out = promtool("check", "config", str(DEPLOY_DIR / "prometheus.yml"))
    assert "alerts.yml" in out  # the compose configuration loads the shipped rules
    assert "SUCCESS: 8 rules found" in promtool("check", "rules", str(ALERTS))


@needs_promtool
def test_each_alert_rule_fires_on_its_unit_test_series() -> None:
    promtool("test", "rules", "alerts_test.yml", cwd=DEPLOY_DIR)


@needs_promtool
def test_make_ups_generated_configuration_passes_promtool(tmp_path: Path) -> None:
    targets = [
        Target("edgeloop", "127.0.0.1:18080", "registry"),
        Target("edgeloop", "127.0.0.1:18089", "registry-2"),
        Target("fleet", "127.0.0.1:18086", "fleet"),
        Target("nats", "127.0.0.1:18088", "nats_metrics"),
    ]
    config = tmp_path / "prometheus.yml"
    config.write_text(scrape_config(targets, every="1s"))
    assert "SUCCESS: 8 rules found" in promtool("check", "config", str(config))


def _api(prometheus: str, path: str, **params: str) -> Any:
    resp = httpx.get(f"{prometheus}/api/v1/{path}", params=params, timeout=10)
    resp.raise_for_status()
    return resp.json()["data"]


def _eventually(check: Any, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``make up`` with Prometheus scraping and evaluating every second: its stack.json."""
    with running_up(tmp_path_factory.mktemp("prom"), EDGELOOP_PROMETHEUS_INTERVAL="1s") as state:
        stack = stack_of(state)
        stack["token"] = (state / "api-token").read_text().strip()
        yield stack


@pytest.mark.slow
@needs_prometheus
@pytest.mark.timeout(300)
def test_prometheus_reports_every_target_of_make_up_up(up: dict[str, Any]) -> None:
    prometheus = up["prometheus_url"]
    wanted = {name for name in up["services"] if name != "traces"} | {"prometheus"}
    assert {"gateway", "fleet", "nats_metrics", "deployer", "monitor"} <= wanted

    seen: dict[str, str] = {}

    def healthy() -> dict[str, str] | None:
        active = _api(prometheus, "targets", state="active")["activeTargets"]
        seen.clear()
        seen.update({t["labels"]["service"]: f"{t['health']} {t['lastError']}" for t in active})
        return dict(seen) if seen and all(h == "up " for h in seen.values()) else None

    try:
        health = _eventually(healthy, 60, "every target up")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the targets: {seen}") from None
    assert set(health) == wanted, health
    # the figures behind the rules are there: NATS's (no Prometheus format of its own),
    # the partitions, the gateway's sessions, the fleet's
    for query in (
        'nats_stream_messages{stream="LIFECYCLE"}',
        'nats_consumer_num_pending{stream="TELEMETRY"}',
        "edgeloop_partitions",
        "edgeloop_gateway_sessions",
        "edgeloop_fleet_connected",
        'edgeloop_deployer_rollouts_total{outcome="rolled_back"}',
    ):
        _eventually(lambda q=query: _api(prometheus, "query", query=q)["result"], 30, query)


@pytest.mark.slow
@needs_prometheus
@pytest.mark.timeout(300)
async def test_a_rolled_back_rollout_fires_its_alert(up: dict[str, Any]) -> None:
    prometheus = up["prometheus_url"]
    headers = {"Authorization": f"Bearer {up['token']}"}
    model = f"prom{int(time.time())}"

    async def firing() -> list[dict[str, Any]]:
        alerts = (await asyncio.to_thread(_api, prometheus, "alerts"))["alerts"]
        return [
            a
            for a in alerts
            if a["labels"]["alertname"] == "EdgeloopRolloutRolledBack" and a["state"] == "firing"
        ]

    assert await firing() == []
    async with (
        httpx.AsyncClient(base_url=up["registry_api"], headers=headers, timeout=30) as registry,
        httpx.AsyncClient(base_url=up["deployer_api"], headers=headers, timeout=30) as deployer,
    ):
        # a validated version rolls out by itself to make up's fleet, and stays in its wave
        policy = {
            "auto_rollout": True,
            "selector": {"fleet": "sim"},
            "waves": [{"percent": 100}],
            "bake_seconds": 600,
        }
        (await deployer.put(f"/v1/policies/{model}", json=policy)).raise_for_status()
        files = classifier("iris")
        await register_version(
            registry,
            model,
            "1",
            files.onnx,
            files.reference,
            suite=files.suite,
            params={"threshold.accuracy": "0.85"},
        )

        async def started() -> list[dict[str, Any]]:
            resp = await deployer.get("/v1/rollouts", params={"model": model})
            resp.raise_for_status()
            return list(resp.json()["rollouts"])

        rollout = (await eventually(started, within=120, what=f"a rollout of {model}"))[0]
        rid = rollout["rollout_id"]
        resp = await deployer.post(f"/v1/rollouts/{rid}/rollback", json={"reason": "test"})
        assert resp.status_code == 200, resp.text

        async def rolled_back() -> bool:
            return bool(
                (await deployer.get(f"/v1/rollouts/{rid}")).json()["state"] == "rolled_back"
            )

        await eventually(rolled_back, within=60, what="the rollback")
    alert = (await eventually(firing, within=60, what="EdgeloopRolloutRolledBack firing"))[0]
    assert alert["labels"]["severity"] == "warning"
    assert "rolled back" in alert["annotations"]["summary"]
