"""``edgeloop shadow report NAME@V``: how a challenger compared with the champion on the
same inputs during its shadow rollouts (the monitor's API)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from edgeloop.cli.api import MONITOR, JsonOption, echo_json, version_ref

app = typer.Typer(help="Shadow (challenger) models on devices.", no_args_is_help=True)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _part(name: str, r: dict[str, Any]) -> list[str]:
    lat = r["latency"]
    lines = [
        f"  {name}: {r['compared']} inputs compared on {r['devices']} devices, agreement "
        f"{_pct(r['agreement'])}, prediction PSI {_num(r['prediction_psi'], '{:.3f}')}",
        f"    latency challenger/champion: p50 {_num(lat['ratio_p50'])}x "
        f"({_num(lat['challenger_p50_ms'], '{:g}')} / {_num(lat['champion_p50_ms'], '{:g}')} ms),"
        f" p99 {_num(lat['ratio_p99'])}x ({_num(lat['challenger_p99_ms'], '{:g}')} / "
        f"{_num(lat['champion_p99_ms'], '{:g}')} ms)",
        f"    budget: {r['sampled_out']} inputs not sampled, {r['skipped_budget']} sampled "
        f"skipped over budget, overhead up to {_num(r['overhead_max'])}x the champion's time",
    ]
    if r["flip_matrix"]:
        lines.append("    champion → challenger:")
        for a, row in r["flip_matrix"].items():
            cells = ", ".join(f"{b}: {n}" for b, n in row.items())
            lines.append(f"      {a:>12} → {cells}")
    return lines


def render(report: dict[str, Any]) -> str:
    """The report as text."""
    head = f"challenger {report['model']}@{report['version']}"
    if not report["groups"]:
        return f"{head}: no comparison yet (no shadow rollout, or no telemetry from one)"
    champions = ", ".join(report["champion_versions"])
    lines = [f"{head} against champion {champions} (rollouts: {', '.join(report['rollouts'])})"]
    lines += _part("all groups", report["overall"])
    for group, part in report["groups"].items():
        lines += _part(f"group {group or '-'}", part)
    return "\n".join(lines)


@app.command()
def report(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION of the challenger")],
    rollout: Annotated[str | None, typer.Option(help="only this shadow rollout's")] = None,
    as_json: JsonOption = False,
) -> None:
    """Agreement, flip matrix, latency ratio and prediction drift of a challenger against
    the champion, per device group."""
    name, version = version_ref(ref)
    params = {"model": name, "version": version}
    if rollout:
        params["rollout_id"] = rollout
    r = MONITOR.request("GET", "/v1/shadow", params=params)
    if as_json:
        echo_json(r)
        return
    typer.echo(render(r))
