"""What a user runs: `edgeloop devices enroll/list/show/revoke`, the `edgeloop-agent`
process from its bundle, and the fleet simulator — against a real gateway."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeloop.cli.main import app
from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.signing import SignatureError, fingerprint, load_public_key
from edgeloop.devstack.testing import eventually
from edgeloop.edge.agent import Agent, AgentConfig
from edgeloop.edge.fleet import Fleet, FleetOptions
from edgeloop.gateway.pki import common_name
from edgeloop.kit.oci.signing import generate_keypair
from tests.edge_harness import PUBLIC, TOKEN, EdgeStack
from tests.modelzoo import classifier

pytestmark = pytest.mark.timeout(180)


def _env(edge: EdgeStack) -> dict[str, str]:
    return {
        "EDGELOOP_GATEWAY_API": f"http://127.0.0.1:{edge.settings.api_port}",
        "EDGELOOP_API_TOKEN": TOKEN,
    }


async def _cli(edge: EdgeStack, *args: str) -> str:
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), env=_env(edge))
    assert result.exit_code == 0, result.output
    return result.output


async def test_enrol_run_the_agent_process_and_list_devices(
    edge: EdgeStack, unique: str, tmp_path: Path
) -> None:
    device = f"cli-{unique}"
    bundle = tmp_path / "bundle"
    out = await _cli(edge, "devices", "enroll", device, "--label", "site=lyon", "-o", str(bundle))
    assert "edgeloop-agent --config" in out
    config = json.loads((bundle / "agent.json").read_text())
    assert config["device_id"] == device
    assert config["gateway"] == f"{edge.settings.grpc_host}:{edge.settings.grpc_port}"
    assert common_name((bundle / "device.crt").read_bytes()) == device
    assert (bundle / "device.key").stat().st_mode & 0o077 == 0
    assert (bundle / "signing.pub").read_bytes() == PUBLIC
    signing = fingerprint(load_public_key(PUBLIC))
    assert f"image-signing key fingerprint: {signing}" in out
    assert config["trusted_key_fingerprints"] == [signing]

    # the agent as a user starts it: its own process, from the bundle
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeloop.edge.agent",
        "--config",
        str(bundle / "agent.json"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        listed = await eventually(
            lambda: _listed(edge, "--selector", "site=lyon", "--online"), within=30
        )
        assert device in listed
        shown = await _cli(edge, "devices", "show", device)
        assert "site=lyon" in shown
        assert "yes" in shown

        image = await edge.publish_image(f"c{unique}", "1", classifier("iris").onnx)
        await edge.set_desired(device, image.desired())
        running = await eventually(lambda: _running(edge, device), within=60)
        assert running["version"] == "1"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    # its state survives: the model is installed in the bundle's state directory
    assert json.loads((bundle / "state" / "state.json").read_text())["current"]["version"] == "1"

    await _cli(edge, "devices", "revoke", device)
    assert "REVOKED" in await _cli(edge, "devices", "show", device)
    none = await asyncio.to_thread(
        CliRunner().invoke, app, ["devices", "show", "nope-" + unique], env=_env(edge)
    )
    assert none.exit_code == 1
    assert "not enrolled" in none.output


async def test_enrolment_prints_the_signing_key_fingerprint_and_checks_the_expected_one(
    edge: EdgeStack, unique: str, tmp_path: Path
) -> None:
    signing = fingerprint(load_public_key(PUBLIC))
    good = tmp_path / "good"
    out = await _cli(
        edge,
        "devices",
        "enroll",
        f"fp-{unique}",
        "-o",
        str(good),
        "--signing-key-fingerprint",
        signing.upper().replace("SHA256:", ""),
    )
    assert f"image-signing key fingerprint: {signing} (matches" in out
    assert signing in await _cli(edge, "signing", "fingerprint", str(good / "signing.pub"))

    # the gateway offers a key other than the one known out of band: no bundle
    _, other = generate_keypair()
    bad = tmp_path / "bad"
    refused = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        [
            "devices",
            "enroll",
            f"fp2-{unique}",
            "-o",
            str(bad),
            "--signing-key-fingerprint",
            fingerprint(load_public_key(other)),
        ],
        env=_env(edge),
    )
    assert refused.exit_code == 1
    assert f"the signing key offered at enrolment is {signing}, not the expected" in refused.output
    assert not (bad / "agent.json").exists()

    # a bundle whose key was swapped before the agent first started: refused, not pinned
    (good / "signing.pub").write_bytes(other)
    with pytest.raises(SignatureError, match="the bundle was altered"):
        Agent(AgentConfig.load(good / "agent.json"))
    assert not (good / "state" / "trust.json").exists()


async def test_fleet_simulator_runs_devices_sharing_one_session(
    edge: EdgeStack, unique: str, tmp_path: Path
) -> None:
    opts = FleetOptions(
        devices=4,
        gateway_api=f"http://127.0.0.1:{edge.settings.api_port}",
        token=TOKEN,
        state_dir=tmp_path / "fleet",
        prefix=f"f{unique}",
        labels={"fleet": unique},
        drift="feature=0,shift=3,after=0s,fraction=1",
        infer_seconds=0.05,
        telemetry_seconds=0.5,
    )
    fleet = Fleet(opts)
    await asyncio.to_thread(fleet.prepare)
    stop = asyncio.Event()
    out = io.StringIO()
    task = asyncio.create_task(fleet.run(stop, out))
    try:
        await eventually(lambda: _all(fleet, lambda c: c["connected"] == 4), within=30)
        image = await edge.publish_image(f"fl{unique}", "1", classifier("iris").onnx)
        for agent in fleet.agents:
            await edge.set_desired(agent.config.device_id, image.desired())
        await eventually(
            lambda: _all(fleet, lambda c: c["versions"].get(f"fl{unique}@1") == 4), within=60
        )
        assert len(fleet.models._models) == 1, "one onnxruntime session for the fleet"
        await eventually(lambda: _all(fleet, lambda c: c["batches_acked"] >= 4), within=30)
        listed = await _cli(edge, "devices", "list", "--selector", f"fleet={unique}", "--json")
        assert len(json.loads(listed)) == 4
    finally:
        stop.set()
        await task
    assert "connected" in out.getvalue()
    assert all(a.state == pb.DEVICE_STATE_RUNNING for a in fleet.agents)


async def test_fleet_simulate_refuses_ids_another_fleet_enrolled(
    edge: EdgeStack, unique: str, tmp_path: Path
) -> None:
    site = f"s{unique}"

    def simulate(state: str, *args: str) -> list[str]:
        return [
            "fleet", "simulate", "-n", "2", "--duration", "1s", "--telemetry", "1s",
            "--state-dir", str(tmp_path / state), *args,
        ]  # fmt: skip

    # a fleet named by its labels: sim-site-<site>-0000x
    first = json.loads(await _cli(edge, *simulate("a", "--label", f"site={site}", "--json")))
    assert first["prefix"] == f"sim-site-{site}"
    assert (first["devices"], first["reused"]) == (2, 0)
    shown = await _cli(edge, "devices", "show", f"sim-site-{site}-00001", "--json")
    assert json.loads(shown)["labels"] == {"site": site}

    # a second fleet whose ids overlap the first's is refused, saying why and what to do
    for args in (("--label", f"site={site}"), ("--prefix", f"sim-site-{site}", "-n", "5")):
        refused = await asyncio.to_thread(
            CliRunner().invoke, app, simulate("b", *args), env=_env(edge)
        )
        assert refused.exit_code == 1, refused.output
        assert "already enrolled" in refused.output, refused.output
        assert f"sim-site-{site}-00000" in refused.output
        assert "--reuse" in refused.output
        assert "--prefix" in refused.output
    assert not (tmp_path / "b").exists(), "nothing enrolled for a refused fleet"

    # told to, it runs them again (their bundles kept)
    again = json.loads(
        await _cli(edge, *simulate("a", "--label", f"site={site}", "--reuse", "--json"))
    )
    assert (again["prefix"], again["reused"]) == (f"sim-site-{site}", 2)

    # without labels, each run is a fleet of its own
    prefixes = {
        json.loads(await _cli(edge, *simulate(f"c{i}", "-n", "1", "--json")))["prefix"]
        for i in range(2)
    }
    assert len(prefixes) == 2, prefixes
    assert all(p.startswith("sim-") for p in prefixes), prefixes


async def _listed(edge: EdgeStack, *args: str) -> str | None:
    out = await _cli(edge, "devices", "list", *args)
    return out if "no devices" not in out else None


async def _running(edge: EdgeStack, device: str) -> dict[str, object] | None:
    reported = await edge.reported(device)
    return reported if reported and reported.get("state") == "running" else None


async def _all(fleet: Fleet, check: object) -> bool:
    return bool(check(fleet.counts()))  # type: ignore[operator]
