"""``edgeloop rollout …`` and ``edgeloop rollouts list``: canary rollouts (the deployer's
API)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from edgeloop.cli.api import DEPLOYER, pairs, when
from edgeloop.contracts.parsing import parse_duration, parse_waves

app = typer.Typer(help="Roll validated versions out to device groups.", no_args_is_help=True)
list_app = typer.Typer(help="Rollouts.", no_args_is_help=True)

FINISHED = ("completed", "rolled_back", "aborted", "refused")


def _fail(message: str) -> typer.Exit:
    typer.secho(message, err=True, fg="red")
    return typer.Exit(2)


@app.command()
def start(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION (a validated version)")],
    selector: Annotated[
        list[str], typer.Option("--selector", "-l", help="k=v[,k=v]: the device group")
    ],
    waves: Annotated[
        str, typer.Option(help="cumulative wave sizes: device counts and percentages")
    ] = "1,10%,50%,100%",
    bake: Annotated[str, typer.Option(help="watch time per wave once it converged")] = "30s",
    max_failures: Annotated[
        str | None,
        typer.Option(help="devices per wave that may fail or not converge: N or P%"),
    ] = None,
    converge_timeout: Annotated[
        str, typer.Option(help="how long a wave's devices have to converge")
    ] = "2m",
    watch: Annotated[bool, typer.Option("--watch", help="then follow it")] = False,
) -> None:
    """Start a rollout; prints its id and plan."""
    name, _, version = ref.partition("@")
    if not name or not version:
        raise _fail("give NAME@VERSION")
    labels: dict[str, str] = {}
    for item in selector:
        labels |= pairs(item.split(","), "--selector")
    try:
        body: dict[str, Any] = {
            "model": name,
            "version": version,
            "selector": labels,
            "waves": [w.model_dump(exclude_none=True) for w in parse_waves(waves)],
            "bake_seconds": parse_duration(bake),
            "converge_timeout_seconds": parse_duration(converge_timeout),
        }
        if max_failures:
            if max_failures.endswith("%"):
                body["max_failures_percent"] = float(max_failures[:-1])
            else:
                body["max_failures"] = int(max_failures)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    r = DEPLOYER.request("POST", "/v1/rollouts", json=body)
    typer.echo(r["rollout_id"])
    typer.echo(
        f"rollout of {name}@{version} to {r['devices']} devices in waves of "
        f"{', '.join(str(n) for n in r['waves_planned'])}; "
        f"follow it: edgeloop rollout status {r['rollout_id']} --watch",
        err=True,
    )
    if watch:
        _watch(r["rollout_id"])


def _bar(done: int, failed: int, size: int, width: int = 24) -> str:
    if size == 0:
        return "[" + " " * width + "]"
    ok = round(width * done / size)
    bad = min(width - ok, round(width * failed / size))
    return "[" + "#" * ok + "x" * bad + "." * (width - ok - bad) + "]"


def render(r: dict[str, Any]) -> str:
    """The status view of one rollout."""
    selector = ",".join(f"{k}={v}" for k, v in sorted(r["selector"].items()))
    lines = [
        f"rollout {r['rollout_id']}  {r['model']}@{r['version']} → {selector}  "
        f"{r['state'].upper()}",
        f"  {r['devices']} devices, bake {r['bake_seconds']:g} s, converge timeout "
        f"{r['converge_timeout_seconds']:g} s, requested {when(r['created_at'])} "
        f"by {r.get('requested_by') or '-'}",
    ]
    for w in r.get("wave_status", []):
        live = w.get("live")
        converged = live["converged"] if live else w["converged"]
        failed = (live["failed"] if live else w["failed"]) or 0
        verdict = f"  verdict {w['verdict']}" if w.get("verdict") else ""
        lines.append(
            f"  wave {w['wave']}  {_bar(converged, failed, w['size'])} "
            f"{converged:>5}/{w['size']:<5} converged {failed:>4} failed (budget {w['budget']})"
            f"  {w['state']}{verdict}"
        )
        if w.get("reason"):
            lines.append(f"          {w['reason']}")
    if r.get("reason"):
        lines.append(f"  reason: {r['reason']}")
    return "\n".join(lines)


def _watch(rollout_id: str) -> None:
    shown = 0
    while True:
        r = DEPLOYER.request("GET", f"/v1/rollouts/{rollout_id}")
        text = render(r)
        if shown:
            typer.echo(f"\x1b[{shown}F\x1b[J", nl=False)  # redraw in place
        typer.echo(text)
        shown = text.count("\n") + 1
        if r["state"] in FINISHED:
            raise typer.Exit(0 if r["state"] == "completed" else 1)
        time.sleep(1)


@app.command()
def status(
    rollout_id: Annotated[str, typer.Argument()],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="follow it until it ends")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output")] = False,
) -> None:
    """A rollout's waves: devices targeted, converged, failed, verdict."""
    if watch:
        _watch(rollout_id)
    r = DEPLOYER.request("GET", f"/v1/rollouts/{rollout_id}")
    typer.echo(json.dumps(r, indent=1) if as_json else render(r))


def _action(verb: str, rollout_id: str, reason: str | None) -> None:
    r = DEPLOYER.request(
        "POST", f"/v1/rollouts/{rollout_id}/{verb}", json={"reason": reason} if reason else None
    )
    typer.echo(f"rollout {rollout_id}: {r['state']}")


@app.command()
def pause(rollout_id: Annotated[str, typer.Argument()]) -> None:
    """Hold the rollout where it is."""
    _action("pause", rollout_id, None)


@app.command()
def resume(rollout_id: Annotated[str, typer.Argument()]) -> None:
    """Go on with a paused rollout."""
    _action("resume", rollout_id, None)


@app.command()
def abort(
    rollout_id: Annotated[str, typer.Argument()],
    reason: Annotated[str | None, typer.Option(help="why, for the record")] = None,
) -> None:
    """Stop the rollout; devices keep what they were given."""
    _action("abort", rollout_id, reason)


@app.command()
def rollback(
    rollout_id: Annotated[str, typer.Argument()],
    reason: Annotated[str | None, typer.Option(help="why, for the record")] = None,
) -> None:
    """Give every device the rollout touched its previous version back."""
    _action("rollback", rollout_id, reason)


@list_app.command("list")
def list_rollouts(
    active: Annotated[bool, typer.Option("--active", help="only rollouts in progress")] = False,
    model: Annotated[str | None, typer.Option(help="only this model's")] = None,
    limit: Annotated[int, typer.Option(help="how many")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output")] = False,
) -> None:
    """Rollouts, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if active:
        params["state"] = "active"
    if model:
        params["model"] = model
    rows = DEPLOYER.request("GET", "/v1/rollouts", params=params)["rollouts"]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo("no rollouts")
        return
    typer.echo(f"{'ROLLOUT':36}  {'MODEL':24} {'STATE':12} {'WAVE':6} {'CREATED':19}  SELECTOR")
    for r in rows:
        ref = f"{r['model']}@{r['version']}"
        wave = f"{r['current_wave'] + 1}/{len(r['waves_planned'])}" if r["waves_planned"] else "-"
        selector = ",".join(f"{k}={v}" for k, v in sorted(r["selector"].items()))
        typer.echo(
            f"{r['rollout_id']:36}  {ref:24} {r['state']:12} {wave:6} "
            f"{when(r['created_at']):19}  {selector}"
        )
