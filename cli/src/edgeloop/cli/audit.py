"""``edgeloop audit log|verify``: the platform's hash-chained audit trail."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from edgeloop.cli.api import REGISTRY, JsonOption, echo_json
from edgeloop.cli.data import instant

app = typer.Typer(
    help="Who changed what, when and why (hash-chained, MACs keyed outside the database).",
    no_args_is_help=True,
)


def _line(r: dict[str, Any]) -> str:
    change = ""
    if r.get("before") is not None or r.get("after") is not None:
        change = f"  {json.dumps(r.get('before'))} → {json.dumps(r.get('after'))}"
    why = f"  ({r['reason']})" if r.get("reason") else ""
    return (
        f"{r['seq']:>6}  {r['at'][:19]}  {r['actor']:<22} {r['action']:<20} "
        f"{r['subject']}{why}{change}"
    )


@app.command("log")
def log(
    model: Annotated[str | None, typer.Option(help="NAME or NAME@VERSION")] = None,
    since: Annotated[str | None, typer.Option(help="1h (ago) or an ISO time")] = None,
    limit: Annotated[int, typer.Option(help="the newest N")] = 200,
    as_json: JsonOption = False,
) -> None:
    """Audit records, oldest first."""
    params: dict[str, Any] = {"limit": limit}
    if model:
        name, _, version = model.partition("@")
        params["model"] = name
        if version:
            params["version"] = version
    if since:
        params["since"] = instant(since)
    rows = REGISTRY.request("GET", "/api/v1/audit", params=params)["records"]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    elif not rows:
        typer.echo("no audit records")
    else:
        typer.echo("\n".join(_line(r) for r in rows))


@app.command("verify")
def verify(as_json: JsonOption = False) -> None:
    """Check the hash chain and the MACs; exit 1 with the first broken link."""
    v = REGISTRY.request("GET", "/api/v1/audit/verify")
    if as_json:
        echo_json(v)
        if not v["ok"]:
            raise typer.Exit(1)
        return
    if v["ok"]:
        checked = (
            "every hash and MAC checks out"
            if v.get("keyed")
            else "every hash checks out (the registry has no audit key: MACs not checked)"
        )
        typer.echo(f"audit trail intact: {v['records']} records, {checked}")
        return
    typer.secho(
        f"audit trail BROKEN at record {v['broken_at']}: {v['problem']} "
        f"(checked {v['records']} records)",
        err=True,
        fg="red",
    )
    raise typer.Exit(1)
