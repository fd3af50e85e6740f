"""``edgeloop fleet simulate``: many simulated devices in one process against a gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

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
    prefix: Annotated[str, typer.Option(help="device ids are PREFIX-00000, …")] = "sim",
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
) -> None:
    """Run DEVICES agents (enrolled through the gateway's API, one shared onnxruntime
    session per model) with injected drift and faults, printing a live summary."""
    from edgeloop.contracts.parsing import parse_duration
    from edgeloop.edge.fleet import FleetOptions, Offline, Slow, api_token
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
            prefix=prefix,
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
    try:
        asyncio.run(run(opts))
    except RuntimeError as exc:
        typer.secho(str(exc), err=True, fg="red")
        raise typer.Exit(1) from exc
