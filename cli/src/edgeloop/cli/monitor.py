"""``edgeloop alarms …`` and ``edgeloop monitor …``: alarms, rules and drift windows (the
monitor's API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeloop.cli.api import MONITOR, JsonOption, check, echo_json, version_ref, when
from edgeloop.contracts.parsing import format_rules, parse_rules

alarms_app = typer.Typer(help="Drift and KPI alarms.", no_args_is_help=True)
app = typer.Typer(help="Drift and KPI monitoring: rules and windows.", no_args_is_help=True)
rules_app = typer.Typer(help="Per-model alarm rules.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")


@alarms_app.command("list")
def list_alarms(
    open_only: Annotated[bool, typer.Option("--open", help="only alarms not resolved")] = False,
    model: Annotated[str | None, typer.Option(help="only this model's")] = None,
    as_json: JsonOption = False,
) -> None:
    """Alarms, newest first."""
    params: dict[str, Any] = {"open": str(open_only).lower()}
    if model:
        params["model"] = model
    rows = MONITOR.request("GET", "/v1/alarms", params=params)["alarms"]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo("no alarms")
        return
    typer.echo(f"{'ALARM':36}  {'MODEL':24} {'RULE':20} {'STATE':13} {'RAISED':19}  MESSAGE")
    for a in rows:
        ref = f"{a['model']}@{a['version']}"
        typer.echo(
            f"{a['alarm_id']:36}  {ref:24} {a['rule']:20} {a['state']:13} "
            f"{when(a['raised_at']):19}  {a['message']}"
        )


@alarms_app.command()
def ack(alarm_id: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Acknowledge an alarm (it resolves when its condition clears)."""
    a = MONITOR.request("POST", f"/v1/alarms/{alarm_id}/ack")
    if as_json:
        echo_json(a)
        return
    typer.echo(f"alarm {alarm_id}: {a['state']} by {a['acked_by']}")


@rules_app.command("show")
def show_rules(
    model: Annotated[str, typer.Argument(help="NAME")], as_json: JsonOption = False
) -> None:
    """The model's rules (its own over the defaults), as YAML."""
    r = MONITOR.request("GET", f"/v1/rules/{model}")
    if as_json:
        echo_json(r)
        return
    typer.echo(f"# rules of {model}; its own: {', '.join(sorted(r['own'])) or 'none'}")
    typer.echo(format_rules(r["rules"]))


@rules_app.command("set")
def set_rules(
    model: Annotated[str, typer.Argument(help="NAME")],
    file: Annotated[Path, typer.Option("--file", "-f", help="rules.yaml (key: number)")],
    as_json: JsonOption = False,
) -> None:
    """Replace the model's own rules with the file's."""
    try:
        rules = parse_rules(file.read_text(), str(file))
    except (OSError, ValueError) as exc:
        typer.secho(f"cannot read {file}: {exc}", err=True, fg="red")
        raise typer.Exit(2) from exc
    r = MONITOR.request("PUT", f"/v1/rules/{model}", json={"rules": rules})
    if as_json:
        echo_json(r)
        return
    own = ", ".join(
        f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={json.dumps(v)}"
        for k, v in sorted(r["own"].items())
    )
    typer.echo(f"rules of {model} set: {own}")


@app.command()
def windows(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION")],
    limit: Annotated[int, typer.Option(help="how many")] = 10,
    as_json: JsonOption = False,
) -> None:
    """Recent windows: inferences, worst feature drift, KPIs."""
    name, _, version = ref.partition("@")
    params: dict[str, Any] = {"model": name, "limit": limit}
    if version:
        params["version"] = version
    rows = MONITOR.request("GET", "/v1/windows", params=params)["windows"]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"{'WINDOW':19}  {'VER':6} {'GROUP':10} {'COUNT':>8}  {'WORST PSI':28} KPIs")
    for w in rows:
        s = w.get("scores") or {}
        feats = s.get("features") or {}
        worst = max(feats.items(), key=lambda kv: kv[1]["psi"], default=None)
        drift = f"{worst[0][:18]} {worst[1]['psi']:.3f}" if worst else "-"
        kpis = ", ".join(f"{k} {v:.3g}" for k, v in sorted((s.get("kpis") or {}).items()))
        state = "" if w["evaluated"] else " (open)"
        typer.echo(
            f"{when(w['window_start']):19}  {w['version']:6} {w.get('group') or '-':10} "
            f"{w['count']:>8}  {drift:28} "
            f"{kpis}{state}"
        )


@app.command()
def report(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    out: Annotated[Path, typer.Option("--out", "-o", help="report.html")] = Path("report.html"),
    as_json: JsonOption = False,
) -> None:
    """The drift report of a version: reference vs current per feature, PSI over time,
    alarms — one self-contained HTML file."""
    name, version = version_ref(ref)
    with MONITOR.client() as client:
        resp = client.get("/v1/report", params={"model": name, "version": version})
    if resp.status_code >= 400:
        check(resp)
    out.write_text(resp.text)
    if as_json:
        echo_json({"model": name, "version": version, "report": str(out), "bytes": len(resp.text)})
        return
    typer.echo(f"drift report of {ref} → {out}")
