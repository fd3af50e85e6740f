"""``edgeloop fleet simulate``: many simulated devices in one process against a gateway.

A fleet's device ids are ``PREFIX-00000`` …; the prefix, unless given, comes from the
fleet's labels (``--label site=x``: ``sim-site-x``) or, without labels, is new at each
run, so that a simulated fleet never takes the identity of devices another fleet (``make
up``'s own ``sim-…``) enrolled. Ids already enrolled are refused unless ``--reuse``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from edgeloop.cli.api import JsonOption, check, echo_json
from edgeloop.contracts.stackfile import load_stack_json, state_dir

app = typer.Typer(help="Simulated fleets of edge devices.", no_args_is_help=True)


@app.command()
def simulate(
    devices: Annotated[int, typer.Option("--devices", "-n", min=1, help="how many devices")] = 10,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="k=v label of every device (repeat)")
    ] = None,
    drift: Annotated[
        str | None,
        typer.Option(help="feature=F,shift=S,after=60s,fraction=0.3: shift a feature later on"),
    ] = None,
    drift_devices: Annotated[
        float, typer.Option(help="share of the devices that drift (0..1)")
    ] = 1.0,
    offline: Annotated[
        str | None,
        typer.Option(help="fraction=0.1,period=30s: devices dropping off the network"),
    ] = None,
    slow: Annotated[
        str | None, typer.Option(help="fraction=0.1,rate=200k: devices on slow links")
    ] = None,
    corrupt: Annotated[
        float, typer.Option(help="probability that a download arrives corrupted")
    ] = 0.0,
    prefix: Annotated[
        str | None,
        typer.Option(
            help="device ids are PREFIX-00000, … (default: from the labels, sim-site-x for "
            "--label site=x; without labels a new sim-XXXXXX each run)"
        ),
    ] = None,
    reuse: Annotated[
        bool,
        typer.Option(
            "--reuse",
            help="run device ids that are already enrolled (refused otherwise): their bundles "
            "in --state-dir are used; one without a bundle there is enrolled again, which "
            "ends the sessions of whoever runs it now",
        ),
    ] = False,
    telemetry: Annotated[str, typer.Option(help="telemetry window per device")] = "10s",
    infer: Annotated[str, typer.Option(help="time between inference batches")] = "1s",
    batch: Annotated[int, typer.Option(help="rows per inference batch")] = 16,
    duration: Annotated[str | None, typer.Option(help="stop after (default: Ctrl-C)")] = None,
    gateway_api: Annotated[
        str | None, typer.Option(envvar="EDGELOOP_GATEWAY_API", help="the gateway's HTTP API")
    ] = None,
    fleet_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="bundles and device state")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run DEVICES agents (enrolled through the gateway's API, one shared onnxruntime
    session per model) with injected drift and faults, printing a live summary."""
    from edgeloop.contracts.parsing import parse_duration
    from edgeloop.edge.fleet import FleetOptions, Offline, Slow, api_token, device_ids
    from edgeloop.edge.fleet import simulate as run
    from edgeloop.edge.sources import Drift

    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--label takes k=v, got {item!r}")
        labels[key] = value
    try:
        if drift:
            Drift.parse(drift)
        opts = FleetOptions(
            devices=devices,
            gateway_api=gateway_api
            or load_stack_json().get("gateway_api", "http://127.0.0.1:18200"),
            token=api_token(),
            state_dir=fleet_dir or state_dir() / "fleet",
            prefix=prefix or default_prefix(labels),
            labels=labels,
            drift=drift,
            drift_devices=drift_devices,
            offline=Offline.parse(offline) if offline else None,
            slow=Slow.parse(slow) if slow else None,
            corrupt=corrupt,
            telemetry_seconds=parse_duration(telemetry),
            infer_seconds=parse_duration(infer),
            infer_batch=batch,
            duration=parse_duration(duration) if duration else None,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not opts.token:
        typer.secho("set EDGELOOP_API_TOKEN (make up writes .edgeloop/api-token)", err=True)
        raise typer.Exit(2)
    ids = device_ids(opts.prefix, opts.devices)
    taken = enrolled(opts.gateway_api, opts.token, ids)
    if taken and not reuse:
        typer.secho(refusal(ids, taken, opts.state_dir), err=True, fg="red")
        raise typer.Exit(1)
    described = f"{_span(ids)}, labels {_labels(labels)}"
    if not as_json:
        typer.echo(f"fleet {opts.prefix}: {described}; state in {opts.state_dir}")
    changed = [d["device_id"] for d in taken if d["labels"] != labels]
    if changed:
        typer.secho(
            f"--reuse: {len(changed)} enrolled device(s) keep the labels they were enrolled "
            f"with, not {_labels(labels)} (e.g. {changed[0]}: {_labels(_of(taken, changed[0]))})",
            err=True,
            fg="yellow",
        )
    try:
        fleet = asyncio.run(run(opts, out=None if as_json else sys.stdout))
    except RuntimeError as exc:
        typer.secho(str(exc), err=True, fg="red")
        raise typer.Exit(1) from exc
    if as_json:
        echo_json({"prefix": opts.prefix, "labels": labels, "reused": len(taken), **fleet.counts()})


#: Devices asked of the gateway's API per page, looking for ids already enrolled.
PAGE = 5000


def default_prefix(labels: dict[str, str]) -> str:
    """The prefix of a fleet nobody named: from its labels (``site=x`` → ``sim-site-x``:
    the same labels name the same devices, which a re-run takes with ``--reuse``), or,
    without labels, new at each run (``sim-3f9c2a``)."""
    if not labels:
        return f"sim-{secrets.token_hex(3)}"
    text = "-".join(f"{k}-{v}" for k, v in sorted(labels.items()))
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not slug or len(slug) > 40 or slug != text.lower():
        # labels a slug does not render one to one: a digest tells them apart
        digest = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:8]
        slug = f"{slug[:31].strip('-')}-{digest}".strip("-")
    return f"sim-{slug}"


def enrolled(gateway_api: str, token: str, ids: list[str]) -> list[dict[str, Any]]:
    """The devices among ``ids`` the gateway has a record of (enrolled, revoked ones too:
    a revoked identity is not for a simulator to take back)."""
    wanted = set(ids)
    found: list[dict[str, Any]] = []
    try:
        with httpx.Client(
            base_url=gateway_api, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as client:
            offset = 0
            while True:
                params = {"limit": PAGE, "offset": offset}
                page = check(client.get("/v1/devices", params=params))["devices"]
                found += [d for d in page if d["device_id"] in wanted]
                if len(page) < PAGE:
                    return found
                offset += PAGE
    except httpx.TransportError as exc:
        typer.secho(f"the gateway API ({gateway_api}) is not reachable: {exc}", err=True, fg="red")
        raise typer.Exit(1) from exc


def refusal(ids: list[str], taken: list[dict[str, Any]], fleet_dir: Path) -> str:
    """Why a fleet whose ids are enrolled already does not start, and what to do."""
    names = sorted(d["device_id"] for d in taken)
    online = sum(1 for d in taken if d.get("online"))
    labels = sorted({_labels(d["labels"]) for d in taken})
    return (
        f"refused: {len(taken)} of the {len(ids)} device ids are already enrolled "
        f"({_span(names)}; labels {' / '.join(labels)}; {online} online now). Another fleet "
        "(make up's own, or an earlier `edgeloop fleet simulate`) has these identities: two "
        "agents with one identity take each other's sessions and mix their telemetry.\n"
        "  new devices:     give another --prefix (or leave it out: the default prefix comes "
        "from the --label values, or is new at each run without labels)\n"
        f"  the same again:  add --reuse (their bundles in {fleet_dir} are used; a device "
        "without one there is enrolled again, which ends the sessions of whoever runs it now)"
    )


def _span(ids: list[str]) -> str:
    if len(ids) <= 3:
        return ", ".join(ids)
    return f"{len(ids)} devices {ids[0]} … {ids[-1]}"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"


def _of(devices: list[dict[str, Any]], device_id: str) -> dict[str, str]:
    return next(dict(d["labels"]) for d in devices if d["device_id"] == device_id)
