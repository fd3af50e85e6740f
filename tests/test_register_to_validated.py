"""The issue's user story through `make up`'s supervisor and the `edgeloop` CLI: a real
scikit-learn model registered from the command line ends in a signed image that skopeo
accepts and a validation report the CLI shows; a bad model ends in a clear failure."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner, Result

from edgeloop.cli.main import app
from edgeloop.contracts.access import SERVICES as ACCESS
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import stream_messages, up_environment
from edgeloop.kit.tokens import SERVICE_ROLES
from tests.modelzoo import ModelFiles, classifier

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    state = tmp_path_factory.mktemp("up")
    env = up_environment(state)
    # a fleet whose inputs drift from the start, short windows: the loop closes in seconds
    env |= {
        "EDGELOOP_FLEET_DRIFT": "feature=2,shift=3,after=0s,fraction=1.0",
        "EDGELOOP_FLEET_TELEMETRY": "1s",
        "EDGELOOP_FLEET_INFER": "0.1s",
        "EDGELOOP_MONITOR_WINDOW_SECONDS": "3",
        "EDGELOOP_MONITOR_GRACE_SECONDS": "1",
    }
    # the services' traces go to an OTLP/gRPC receiver this test runs (make up then runs
    # no collector of its own)
    otlp_port, query_port = free_port(), free_port()
    collector = subprocess.Popen(
        [sys.executable, "-m", "edgeloop.devstack.traces"],
        env={
            **os.environ,
            "EDGELOOP_TRACES_OTLP_PORT": str(otlp_port),
            "EDGELOOP_TRACES_QUERY_PORT": str(query_port),
        },
        stdout=(state / "traces.out").open("wb"),
        stderr=subprocess.STDOUT,
    )
    env |= {
        "EDGELOOP_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "EDGELOOP_TRACES_API": f"http://127.0.0.1:{query_port}",
    }
    log = (state / "up.out").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeloop.devstack.up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    cli_env = {"EDGELOOP_STATE_DIR": str(state)}
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (state / "up.out").read_text()
            if (state / "stack.json").exists():
                result = runner.invoke(app, ["status"], env=cli_env)
                if result.exit_code == 0:
                    break
            assert time.monotonic() < deadline, result.output
            time.sleep(0.5)
        yield cli_env
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        collector.terminate()
        collector.wait(30)


def _wait_report(env: dict[str, str], ref: str) -> dict[str, object]:
    deadline = time.monotonic() + 90
    while True:
        result = runner.invoke(app, ["validations", "show", ref, "--json"], env=env)
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        if report["state"] != "pending":
            return dict(report)
        assert time.monotonic() < deadline, "validation did not finish"
        time.sleep(0.5)


def _register(
    env: dict[str, str], tmp_path: Path, name: str, m: ModelFiles, *options: str
) -> Result:
    """``edgeloop models register`` of a scikit-learn model with its suite and reference."""
    for file, data in (("model.onnx", m.onnx), ("suite.npz", m.suite), ("ref.npz", m.reference)):
        (tmp_path / file).write_bytes(data)
    return runner.invoke(
        app,
        [
            "models",
            "register",
            str(tmp_path / "model.onnx"),
            "--name",
            name,
            "--suite",
            str(tmp_path / "suite.npz"),
            "--reference",
            str(tmp_path / "ref.npz"),
            *options,
        ],
        env=env,
    )


def test_register_to_validated_from_the_cli(stack: dict[str, str], tmp_path: Path) -> None:
    result = _register(
        stack,
        tmp_path,
        "breast-cancer",
        classifier(),
        "--commit",
        "0123abc",
        "--param",
        "threshold.accuracy=0.9",
        "--tag",
        "team=ds",
    )
    assert result.exit_code == 0, result.output
    version = result.output.strip()
    assert version == "1"
    report = _wait_report(stack, f"breast-cancer@{version}")
    assert report["state"] == "passed", report
    human = runner.invoke(app, ["validations", "show", f"breast-cancer@{version}"], env=stack)
    assert "accuracy" in human.output
    assert "recommended:" in human.output
    # for people: sections, the pullable image, no raw JSON
    human = runner.invoke(app, ["models", "show", f"breast-cancer@{version}"], env=stack)
    assert human.exit_code == 0, human.output
    for section in ("artifacts", "signature", "build", "validation", "latency profile"):
        assert f"\n{section}" in human.output, human.output
    assert '{"' not in human.output, human.output
    shown = runner.invoke(app, ["models", "show", f"breast-cancer@{version}", "--json"], env=stack)
    body = json.loads(shown.output)
    pullable = f"{body['build_detail']['image']}@{body['build_detail']['digest']}"
    assert pullable.split("@")[1].startswith("sha256:")
    assert pullable in human.output, human.output
    assert "threshold.accuracy=0.9" in human.output
    assert "accuracy" in human.output
    assert body["source_commit"] == "0123abc"
    assert body["aliases"] == ["candidate"]
    image = body["build_detail"]["image"]
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    out = subprocess.run(
        [skopeo, "inspect", "--tls-verify=false", f"docker://{image}:{version}-validated"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout)["Labels"]["edgeloop.source_commit"] == "0123abc"


def test_validated_version_rolls_out_to_the_fleet_from_the_cli(
    stack: dict[str, str], tmp_path: Path
) -> None:
    """The operator's story: register, wait for validation, roll out in waves to the
    simulated fleet `make up` runs, watch it complete, see the devices run it."""
    result = _register(stack, tmp_path, "iris-fleet", classifier("iris"))
    assert result.exit_code == 0, result.output
    assert _wait_report(stack, "iris-fleet@1")["state"] == "passed"
    started = runner.invoke(
        app,
        [
            "rollout",
            "start",
            "iris-fleet@1",
            "--selector",
            "fleet=sim",
            "--waves",
            "1,100%",
            "--bake",
            "1s",
            "--watch",
        ],
        env=stack,
    )
    assert started.exit_code == 0, started.output
    assert "COMPLETED" in started.output
    assert "wave 1" in started.output
    listed = runner.invoke(app, ["rollouts", "list"], env=stack)
    assert "iris-fleet@1" in listed.output
    assert "completed" in listed.output
    deadline = time.monotonic() + 15  # the device registry follows reported state
    while True:
        shown = runner.invoke(
            app, ["devices", "list", "--selector", "fleet=sim", "--json"], env=stack
        )
        devices = json.loads(shown.output)
        running = {(d["model"], d["version"], d["state"]) for d in devices}
        if running == {("iris-fleet", "1", "running")} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(devices) == 5
    assert running == {("iris-fleet", "1", "running")}

    # the fleet's inputs drift (make up runs it with a drift here): the monitor raises an
    # alarm and asks for retraining; the example trainer registers iris-fleet@2 from the
    # stored samples; the builder and the validator take it through
    alarm = _wait_json(
        stack,
        ["alarms", "list", "--open", "--model", "iris-fleet", "--json"],
        lambda rows: [a for a in rows if a["rule"] == "drift_psi"],
        "a drift alarm",
    )[0]
    assert "petal length" in alarm["message"]
    state = Path(stack["EDGELOOP_STATE_DIR"])
    with (state / "retrain.out").open("wb") as log:
        trainer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "examples.retrain",
                "--dataset",
                "iris",
                "--model",
                "iris-fleet",
                "--collect-seconds",
                "5",
            ],
            env={**os.environ, **stack},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while runner.invoke(app, ["models", "show", "iris-fleet@2"], env=stack).exit_code:
            assert trainer.poll() is None, (state / "retrain.out").read_text()
            assert time.monotonic() < deadline, (state / "retrain.out").read_text()
            time.sleep(1)
        report = _wait_report(stack, "iris-fleet@2")
    finally:
        trainer.terminate()
        trainer.wait(30)
    assert report["state"] == "passed", report
    v2 = json.loads(
        runner.invoke(app, ["models", "show", "iris-fleet@2", "--json"], env=stack).output
    )
    assert (v2["parent_model"], v2["parent_version"]) == ("iris-fleet", "1")
    assert v2["retrain_request_id"] == alarm["retrain_request_id"]
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["monitor", "report", "iris-fleet@1", "-o", str(out)], env=stack)
    assert result.exit_code == 0, result.output
    assert "<svg" in out.read_text()
    assert "feature drift" in out.read_text()


def _wait_json(env: dict[str, str], args: list[str], pick: Callable[[Any], Any], what: str) -> Any:
    deadline = time.monotonic() + 90
    while True:
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 0, result.output
        found = pick(json.loads(result.output))
        if found:
            return found
        assert time.monotonic() < deadline, f"no {what} in 90 s"
        time.sleep(1)


def test_bad_model_ends_in_a_clear_failure(stack: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"this is a pickle, not onnx")
    result = runner.invoke(
        app, ["models", "register", str(tmp_path / "bad.onnx"), "--name", "bad"], env=stack
    )
    assert result.exit_code == 1
    assert "not a model onnxruntime can load" in result.output
    weak = classifier(c=1e-5)
    (tmp_path / "weak.onnx").write_bytes(weak.onnx)
    (tmp_path / "suite.npz").write_bytes(weak.suite)
    result = runner.invoke(
        app,
        [
            "models",
            "register",
            str(tmp_path / "weak.onnx"),
            "--name",
            "weak",
            "--suite",
            str(tmp_path / "suite.npz"),
            "--param",
            "threshold.accuracy=0.99",
        ],
        env=stack,
    )
    assert result.exit_code == 0, result.output
    report = _wait_report(stack, "weak@1")
    assert report["state"] == "failed"
    assert any("below the threshold 0.99" in r for r in report["reasons"])  # type: ignore[attr-defined]
    human = runner.invoke(app, ["validations", "show", "weak@1"], env=stack)
    assert "below the threshold" in human.output


def test_each_secret_reaches_only_its_service(stack: dict[str, str]) -> None:
    import psutil

    from edgeloop.contracts.stackfile import load_stack_json

    info = load_stack_json(Path(stack["EDGELOOP_STATE_DIR"]) / "stack.json")
    env = {name: psutil.Process(svc["pid"]).environ() for name, svc in info["services"].items()}
    assert "EDGELOOP_BUILDER_SIGNING_KEY" in env["builder"]
    assert "EDGELOOP_BUILDER_SIGNING_KEY" not in env["registry"]
    assert "EDGELOOP_BUILDER_SIGNING_KEY" not in env["validator"]
    assert "EDGELOOP_REGISTRY_API_TOKENS" not in env["builder"]
    # each service connects to NATS as itself, and knows no other's password
    for name, own in env.items():
        users = {k for k in own if k.endswith("_NATS_PASSWORD")}
        if name in ACCESS:
            assert own[f"EDGELOOP_{name.upper()}_NATS_USER"] == name
            assert users == {f"EDGELOOP_{name.upper()}_NATS_PASSWORD"}, name
        else:
            assert users == set(), name
    # the admin token only where an API accepts it; each service calls with its own
    state = Path(stack["EDGELOOP_STATE_DIR"])
    admin = (state / "api-token").read_text().strip()
    own = {n: (state / "service-tokens" / n).read_text().strip() for n in SERVICE_ROLES}
    assert admin not in own.values()
    for name, variables in env.items():
        held = {k for k, v in variables.items() if v == admin}
        accepts = {f"EDGELOOP_{name.upper()}_API_TOKENS"} & set(variables)
        assert held == accepts, name
        assert accepts or name not in ("registry", "deployer", "monitor", "gateway"), name
        for caller, token in own.items():
            holds = {k for k, v in variables.items() if v == token}
            assert bool(holds) == (caller == name), (name, caller, holds)
    listed = runner.invoke(app, ["tokens", "list"], env=stack)
    assert listed.exit_code == 0, listed.output
    for caller, role in SERVICE_ROLES.items():
        line = next(x for x in listed.output.splitlines() if x.startswith(f"service:{caller} "))
        assert line.split()[1] == role, line


def test_the_demo_closes_the_loop(stack: dict[str, str], tmp_path: Path) -> None:
    """`make demo`'s story against `make up`: v1 registered, built, validated, rolled out
    by its release policy; drift → alarm → retrain request → v2 from the example trainer
    → built, validated, canary, promoted."""
    out = tmp_path / "demo.json"
    log = tmp_path / "demo.out"
    with log.open("wb") as sink:
        done = subprocess.run(
            # the installed command, as a user runs it in the checkout
            [str(Path(sys.executable).parent / "edgeloop"), "demo", "--devices", "30",
             "--bake", "5", "--json", str(out)],
            env={**os.environ, **stack},
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )  # fmt: skip
    assert done.returncode == 0, log.read_text()
    story = json.loads(out.read_text())
    events = [tuple(e) for e in story["events"]]

    def at(subject: str, version: str) -> int:
        assert (subject, version) in events, (subject, version, events)
        return events.index((subject, version))

    order = [
        at("model.committed", "1"),
        at("image.built", "1"),
        at("validation.passed", "1"),
        at("rollout.requested", "1"),
        at("rollout.completed", "1"),
        at("alarm.raised", "1"),
        at("retrain.requested", "1"),
        at("model.committed", "2"),
        at("validation.passed", "2"),
        at("rollout.requested", "2"),
        at("rollout.completed", "2"),
    ]
    assert order == sorted(order)
    assert ("rollout.rolled_back", "2") not in events
    waves = [e for e in events if e == ("rollout.wave.succeeded", "2")]
    assert len(waves) == 2  # the canary wave, then everyone
    text = log.read_text()
    assert "done in" in text
    assert "edgeloop rollout status" in text  # it says where to look
    # each event told once; an alarm per rule that fired, each retrain request naming its
    # rule and alarm (two alike lines were two rules' alarms, not one alarm twice)
    told = [line.partition("] ")[2] for line in text.splitlines() if line.startswith("[")]
    alarms = [line for line in told if line.startswith("alarm.raised")]
    assert alarms, text
    assert len(set(told)) == len(told), text
    for line in (line for line in told if line.startswith("retrain.requested")):
        assert " for " in line, line
        assert "(alarm " in line, line
    # the lineage of v2: its parent, the alarm and retraining request behind it, its image,
    # validation, rollout and the devices running it
    model = story["model"]
    shown = runner.invoke(app, ["models", "lineage", f"{model}@2", "--json"], env=stack)
    assert shown.exit_code == 0, shown.output
    lineage = json.loads(shown.output)
    v2 = lineage["registry"]
    assert (v2["parent_model"], v2["parent_version"]) == (model, "1")
    assert lineage["retrain_alarm"]["retrain_request_id"] == v2["retrain_request_id"]
    assert lineage["retrain_alarm"]["version"] == "1"
    assert v2["build_detail"]["signature_digest"]
    assert v2["validation_state"] == "passed"
    assert [r["state"] for r in lineage["rollouts"]] == ["completed"]
    assert len(lineage["devices"]) == 30
    text = runner.invoke(app, ["models", "lineage", f"{model}@2"], env=stack).output
    assert "caused by      alarm" in text
    assert "running on       30 devices (" in text


def test_one_trace_per_version_from_registration_to_each_device(
    stack: dict[str, str], tmp_path: Path
) -> None:
    """The spans the services send over OTLP to the test's receiver form one tree per
    version: registration → build → validation; the rollout → its waves → each device's
    activation; `edgeloop trace` finds it by the version."""
    assert _register(stack, tmp_path, "iris-trace", classifier("iris")).exit_code == 0
    assert _wait_report(stack, "iris-trace@1")["state"] == "passed"
    started = runner.invoke(
        app,
        ["rollout", "start", "iris-trace@1", "--selector", "fleet=sim", "--waves", "1,100%",
         "--bake", "1s", "--watch"],
        env=stack,
    )  # fmt: skip
    assert started.exit_code == 0, started.output
    version = json.loads(
        runner.invoke(app, ["models", "show", "iris-trace@1", "--json"], env=stack).output
    )
    trace_id = version["trace_parent"].split("-")[1]

    def activations() -> dict[str, Any] | None:
        shown = runner.invoke(app, ["trace", "iris-trace@1", "--json"], env=stack)
        assert shown.exit_code == 0, shown.output
        doc = json.loads(shown.output)
        n = sum(s["operationName"].startswith("activate on ") for s in doc.get("spans", []))
        return doc if n >= 5 else None

    doc = _until(activations, "the five devices' activation spans")
    spans = {s["spanID"]: s for s in doc["spans"]}
    services = {pid: p["serviceName"] for pid, p in doc["processes"].items()}
    assert {s["traceID"] for s in spans.values()} == {trace_id}

    def parent(s: dict[str, Any]) -> dict[str, Any] | None:
        refs = [r["spanID"] for r in s["references"] if r["refType"] == "CHILD_OF"]
        return spans.get(refs[0]) if refs else None

    def ancestry(s: dict[str, Any]) -> list[str]:
        names = []
        node: dict[str, Any] | None = s
        while node is not None:
            names.append(f"{services[node['processID']]}:{node['operationName']}")
            node = parent(node)
        return names

    roots = [s for s in spans.values() if parent(s) is None]
    assert [ancestry(r) for r in roots] == [["registry:register iris-trace"]]
    named = {ancestry(s)[0]: ancestry(s) for s in spans.values()}
    assert named["builder:builder process"][-1] == "registry:register iris-trace"
    assert "builder:builder process" in named["validator:validator process"]
    devices = [a for key, a in named.items() if key.startswith("gateway:activate on sim-")]
    assert len(devices) == 5
    for chain in devices:
        assert "deployer:rollout iris-trace@1" in chain
        assert chain[-1] == "registry:register iris-trace"
    assert {"deployer:wave 0 writing", "deployer:wave 1 writing"} <= set(named)
    # the agents' downloads carry the rollout's context in gRPC metadata
    fetches = [a for key, a in named.items() if key.startswith("gateway:fetch artifact for sim-")]
    assert fetches
    assert all("deployer:rollout iris-trace@1" in chain for chain in fetches)
    text = runner.invoke(app, ["trace", "iris-trace@1"], env=stack).output
    assert text.splitlines()[0].startswith(f"trace {trace_id}: ")
    assert text.splitlines()[1].strip().startswith("register iris-trace  [registry]")


def _until(check: Callable[[], Any], what: str, within: float = 30) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {within:.0f} s"
        time.sleep(0.5)


def test_the_audit_trail_records_each_action_and_shows_tampering(
    stack: dict[str, str], tmp_path: Path
) -> None:
    """Register, build, validate, move an alias: each is on the record with its actor and
    trace; `audit verify` checks the hash chain and names the first altered record."""
    assert _register(stack, tmp_path, "iris-audit", classifier("iris")).exit_code == 0
    assert _wait_report(stack, "iris-audit@1")["state"] == "passed"
    moved = runner.invoke(app, ["models", "alias", "set", "iris-audit", "champion", "1"], env=stack)
    assert moved.exit_code == 0, moved.output
    shown = runner.invoke(app, ["audit", "log", "--model", "iris-audit@1", "--json"], env=stack)
    assert shown.exit_code == 0, shown.output
    records = {r["action"]: r for r in json.loads(shown.output)}
    assert {"model.register", "image.build", "validation.passed", "model.alias"} <= set(records)
    assert records["model.register"]["actor"].startswith("token:")
    assert records["image.build"]["actor"] == "service:builder"
    assert records["model.alias"]["after"] == {"version": "1"}
    version = json.loads(
        runner.invoke(app, ["models", "show", "iris-audit@1", "--json"], env=stack).output
    )
    trace_id = version["trace_parent"].split("-")[1]
    assert records["model.register"]["trace_id"] == trace_id
    assert records["validation.passed"]["trace_id"] == trace_id  # the same version's trace
    assert runner.invoke(app, ["audit", "verify"], env=stack).exit_code == 0

    seq = records["image.build"]["seq"]
    dsn = json.loads((Path(stack["EDGELOOP_STATE_DIR"]) / "stack.json").read_text())["database_url"]

    def alter(reason: str | None) -> None:
        async def run() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(
                    "UPDATE audit.records SET reason = $2 WHERE seq = $1", seq, reason
                )
            finally:
                await conn.close()

        asyncio.run(run())

    alter("nothing to see here")
    broken = runner.invoke(app, ["audit", "verify"], env=stack)
    assert broken.exit_code == 1
    assert f"BROKEN at record {seq}" in broken.output
    alter(None)  # put back as it was: the chain checks out again
    intact = runner.invoke(app, ["audit", "verify"], env=stack)
    assert intact.exit_code == 0
    assert "every hash and MAC checks out" in intact.output

    # the database's owner rewrites the record and recomputes every hash after it: the
    # unkeyed chain would check out, the MACs (their key outside the database) do not
    asyncio.run(_rewrite_history(dsn, seq, "nothing to see here"))
    rewritten = runner.invoke(app, ["audit", "verify"], env=stack)
    assert rewritten.exit_code == 1
    assert f"BROKEN at record {seq}: its MAC does not match" in rewritten.output


async def _rewrite_history(dsn: str, seq: int, reason: str) -> None:
    """As the superuser: set record ``seq``'s reason and re-hash the chain from it on."""
    from edgeloop.kit.audit import record_hash

    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT seq, at, service, actor, action, subject, model, version, before, "
                "after, reason, trace_id, prev_hash FROM audit.records WHERE seq >= $1 "
                "ORDER BY seq",
                seq,
            )
            prev = rows[0]["prev_hash"]
            for r in rows:
                row = dict(r) | {"prev_hash": prev}
                for key in ("before", "after"):
                    row[key] = None if row[key] is None else json.loads(row[key])
                if row["seq"] == seq:
                    row["reason"] = reason
                prev = record_hash(row)
                await conn.execute(
                    "UPDATE audit.records SET reason = $2, prev_hash = $3, hash = $4 "
                    "WHERE seq = $1",
                    row["seq"],
                    row["reason"],
                    row["prev_hash"],
                    prev,
                )
    finally:
        await conn.close()


def test_each_service_connects_to_postgresql_as_its_own_role(stack: dict[str, str]) -> None:
    """`make up` bootstrapped a role per service: every service's connections (named by
    their schema) are its role's, none is a superuser's."""
    dsn = json.loads((Path(stack["EDGELOOP_STATE_DIR"]) / "stack.json").read_text())["database_url"]

    async def sessions() -> dict[str, set[str]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT application_name, usename FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = ANY($1::text[])",
                list(ACCESS),
            )
        finally:
            await conn.close()
        out: dict[str, set[str]] = {}
        for r in rows:
            out.setdefault(r["application_name"], set()).add(r["usename"])
        return out

    assert asyncio.run(sessions()) == {name: {f"edgeloop_{name}"} for name in ACCESS}


def test_no_service_was_refused_by_nats(stack: dict[str, str]) -> None:
    """After the module's stories (register, build, validate, roll out, the demo's whole
    loop), with every service on its own NATS user: the server refused none of them."""
    log = (Path(stack["EDGELOOP_STATE_DIR"]) / "nats" / "nats.log").read_text()
    refused = [line for line in log.splitlines() if "Violation" in line or "authentication" in line]
    assert refused == [], refused[:5]


def test_no_secret_in_an_event_a_log_line_or_an_image(stack: dict[str, str]) -> None:
    """Last in this module, after the stack built, validated and rolled out versions and
    ran the demo: the API tokens (the admin's, each service's), the signing key and the
    passwords appear in no event (LIFECYCLE, DEVICE, DLQ: payloads and headers), no
    service's log and no stored image layer."""
    state = Path(stack["EDGELOOP_STATE_DIR"])
    token = (state / "api-token").read_text().strip()
    key_lines = [
        line
        for line in (state / "signing-key.pem").read_text().splitlines()
        if line and not line.startswith("-----")
    ]
    passwords = [
        p.read_text().strip()
        for d in ("nats-users", "pg-users", "service-tokens")
        for p in (state / d).iterdir()
    ]
    secrets = [token.encode(), *(line.encode() for line in key_lines)]
    secrets += [p.encode() for p in [*passwords, (state / "audit-key").read_text().strip()]]
    assert all(len(s) >= 16 for s in secrets)

    def leaks(data: bytes) -> list[bytes]:
        return [s for s in secrets if s in data]

    async def events() -> list[tuple[str, bytes]]:
        import nats

        nc = await nats.connect(json.loads((state / "stack.json").read_text())["nats_url"])
        try:
            out = []
            for stream in ("LIFECYCLE", "DEVICE", "DLQ"):
                for m in await stream_messages(nc.jetstream(), stream, ">"):
                    out.append((m.subject, m.data + json.dumps(m.headers or {}).encode()))
            return out
        finally:
            await nc.close()

    scanned = asyncio.run(events())
    assert len(scanned) > 50  # the module's tests did put events there
    assert [subject for subject, data in scanned if leaks(data)] == []
    logs = list((state / "logs").glob("*.log"))
    assert logs
    assert [p.name for p in logs if leaks(p.read_bytes())] == []
    layers = 0
    for blob in (state / "registry").rglob("data"):
        data = blob.read_bytes()
        if data[:2] == b"\x1f\x8b":  # a gzipped layer: look inside
            data = gzip.decompress(data)
            layers += 1
        assert not leaks(data), blob
    assert layers > 0
