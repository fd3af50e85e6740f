"""``edgeloop devices …``: enrol devices and look at the device registry (the gateway's
API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from edgeloop.cli.api import DEPLOYER, GATEWAY, MONITOR, JsonOption, echo_json, pairs, when
from edgeloop.contracts.signing import SignatureError
from edgeloop.edge.bundle import write_bundle

app = typer.Typer(help="Enrol edge devices and look at them.", no_args_is_help=True)


@app.command()
def enroll(
    device_id: Annotated[str, typer.Argument(help="the device's id (its certificate's name)")],
    label: Annotated[
        list[str] | None, typer.Option("--label", help="k=v selector label (repeat)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="bundle directory (default ./DEVICE_ID)")
    ] = None,
    signing_key_fingerprint: Annotated[
        str | None,
        typer.Option(
            help="the image-signing key's fingerprint as known out of band (sha256:…); "
            "the bundle is not written when the gateway offers another key"
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Issue the device's client certificate and write its agent bundle.

    The bundle's image-signing key is what the device will trust (it pins it on its
    first start): compare the printed fingerprint with the platform's, out of band.
    """
    body = GATEWAY.request(
        "POST", f"/v1/devices/{device_id}/enroll", json={"labels": pairs(label, "--label")}
    )
    bundle = out or Path(device_id)
    try:
        config = write_bundle(bundle, body, expected_fingerprint=signing_key_fingerprint)
    except SignatureError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if as_json:  # what was issued, less the private key (it is in the bundle only)
        public = {k: v for k, v in body.items() if k != "private_key"}
        echo_json({**public, "bundle": str(bundle), "config": str(config)})
        return
    typer.echo(
        f"enrolled {device_id} (certificate {body['fingerprint'][:16]}…, "
        f"valid until {body['expires_at'][:10]})"
    )
    pinned = json.loads(config.read_text())["trusted_key_fingerprints"]
    if pinned:
        checked = " (matches --signing-key-fingerprint)" if signing_key_fingerprint else ""
        typer.echo(f"image-signing key fingerprint: {pinned[0]}{checked}")
        if not signing_key_fingerprint:
            typer.echo(
                "  compare it with the platform's (edgeloop signing fingerprint KEY) "
                "before starting the agent: the device pins this key"
            )
    else:
        typer.echo("warning: the gateway offers no image-signing key: the device refuses images")
    typer.echo(f"bundle: {bundle}/   start it: edgeloop-agent --config {bundle}/agent.json")


@app.command("list")
def list_devices(
    selector: Annotated[str | None, typer.Option(help="k=v[,k=v…]: labels to match")] = None,
    online: Annotated[
        bool | None, typer.Option("--online/--offline", help="only online/offline devices")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Devices of the registry, by id."""
    params: dict[str, Any] = {}
    if selector:
        params["selector"] = selector
    if online is not None:
        params["online"] = str(online).lower()
    devices = GATEWAY.request("GET", "/v1/devices", params=params)["devices"]
    if as_json:
        typer.echo(json.dumps(devices, indent=1))
        return
    if not devices:
        typer.echo("no devices")
        return
    typer.echo(f"{'DEVICE':24} {'ONLINE':7} {'MODEL':24} {'STATE':9} {'LAST SEEN':19}  LABELS")
    for d in devices:
        model = f"{d['model']}@{d['version']}" if d.get("model") else "-"
        labels = ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))
        typer.echo(
            f"{d['device_id']:24} {'yes' if d['online'] else 'no':7} {model:24} "
            f"{d.get('state') or '-':9} {when(d.get('last_seen')):19}  {labels}"
        )


@app.command()
def show(
    device_id: Annotated[str, typer.Argument()],
    as_json: JsonOption = False,
) -> None:
    """One device: identity, labels, session, what it runs and last reported, where it is
    in its latest rollout (e.g. a straggler ``pending (offline since …)`` or ``stale``), and
    the telemetry refused (at the gateway) or found implausible (by the monitor)."""
    d = GATEWAY.request("GET", f"/v1/devices/{device_id}")
    d["monitor_rejections"] = _monitor_rejections(device_id)
    d["rollouts"] = _rollouts(device_id)
    if as_json:
        typer.echo(json.dumps(d, indent=1))
        return
    rows = [
        ("device", d["device_id"]),
        ("labels", _pairs(d["labels"])),
        ("reported labels", _pairs(d.get("reported_labels") or {}) + " (not used for targeting)"),
        ("online", f"{'yes' if d['online'] else 'no'} (gateway {d.get('gateway_id') or '-'})"),
        ("model", f"{d['model']}@{d['version']}" if d.get("model") else "-"),
        ("image digest", d.get("digest") or "-"),
        ("state", d.get("state") or "-"),
        ("error", d.get("error") or "-"),
        ("enrolled", when(d["enrolled_at"])),
        ("first/last seen", f"{when(d.get('first_seen'))} / {when(d.get('last_seen'))}"),
        (
            "certificate",
            f"{d['fingerprint'][:16]}… until {when(d['cert_not_after'])}"
            + (" REVOKED" if d["revoked"] else ""),
        ),
    ]
    if d["rollouts"] is None:
        rows.append(("rollout", "the deployer is not reachable"))
    elif not d["rollouts"]:
        rows.append(("rollout", "-"))
    else:
        latest = d["rollouts"][0]
        rows.append(
            (
                "rollout",
                f"{latest['model']}@{latest['version']} ({latest['rollout_id']}, "
                f"{latest['state']}): {latest['status_text']}",
            )
        )
    refused = d.get("refusals") or {}
    rows.append(("refused batches", _pairs(refused)))
    if refused:
        rows.append(("last refused", f"{when(d.get('last_refusal_at'))}: {d['last_refusal']}"))
    monitor = d["monitor_rejections"]
    rows.append(
        (
            "monitor",
            "not reachable"
            if monitor is None
            else _pairs({r["code"]: r["count"] for r in monitor}),
        )
    )
    for r in monitor or []:
        rows.append((f"  {r['code']}", r["last_reason"]))
    for key, value in rows:
        typer.echo(f"{key:16} {value}")


def _pairs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"


def _rollouts(device_id: str) -> list[dict[str, Any]] | None:
    """The rollouts that reach the device, newest first, with its status in each (None
    when the deployer cannot be asked)."""
    try:
        with DEPLOYER.client() as client:
            resp = client.get(f"/v1/devices/{device_id}/rollouts")
    except httpx.TransportError:
        return None
    if resp.status_code != 200:
        return None
    return list(resp.json()["rollouts"])


def _monitor_rejections(device_id: str) -> list[dict[str, Any]] | None:
    """The monitor's count of the device's refused batches and implausible windows (None
    when the monitor cannot be asked)."""
    try:
        with MONITOR.client() as client:
            resp = client.get("/v1/rejections", params={"device_id": device_id})
    except httpx.TransportError:
        return None
    if resp.status_code != 200:
        return None
    return list(resp.json()["rejections"])


@app.command()
def revoke(device_id: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Refuse the device's certificate from its next session on."""
    body = GATEWAY.request("POST", f"/v1/devices/{device_id}/revoke")
    if as_json:
        echo_json(body)
        return
    typer.echo(f"revoked {device_id}")
