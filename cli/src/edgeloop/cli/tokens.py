"""``edgeloop tokens issue|list|revoke``: API tokens with roles (admin only)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from edgeloop.cli.api import REGISTRY, JsonOption, echo_json, when

app = typer.Typer(
    help="API tokens with a role: viewer, data-scientist, operator, admin.", no_args_is_help=True
)


@app.command("issue")
def issue(
    name: Annotated[str, typer.Option(help="who or what holds it, e.g. alice or ci")],
    role: Annotated[str, typer.Option(help="viewer | data-scientist | operator | admin")],
    expires: Annotated[str | None, typer.Option(help="e.g. 30d, 12h (default: never)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Issue a token; it is printed once (keep it: only its hash is stored)."""
    body: dict[str, Any] = {"name": name, "role": role, "expires_in": expires}
    t = REGISTRY.request("POST", "/api/v1/tokens", json=body)
    if as_json:  # the token is in it, shown this once
        echo_json(t)
        return
    typer.echo(t["token"])
    until = f", expires {when(t['expires_at'])}" if t.get("expires_at") else ""
    typer.echo(f"token {t['name']} with the role {t['role']}{until}; shown once", err=True)


@app.command("list")
def list_tokens(
    as_json: JsonOption = False,
) -> None:
    """Issued tokens (never their secrets)."""
    rows = REGISTRY.request("GET", "/api/v1/tokens")["tokens"]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo("no issued tokens")
        return
    typer.echo(f"{'NAME':24} {'ROLE':15} {'CREATED':19} {'EXPIRES':19} STATE")
    for t in rows:
        state = "revoked" if t.get("revoked_at") else "active"
        expires = when(t["expires_at"]) if t.get("expires_at") else "-"
        typer.echo(f"{t['name']:24} {t['role']:15} {when(t['created_at']):19} {expires:19} {state}")


@app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="the token's name")], as_json: JsonOption = False
) -> None:
    """Revoke a token: every API refuses it from now on."""
    body = REGISTRY.request("POST", f"/api/v1/tokens/{name}/revoke")
    if as_json:
        echo_json(body)
        return
    typer.echo(f"token {name} revoked")
