"""``edgeloop notify add|list|remove|test|deliveries|retry``: signed webhooks for lifecycle
events (the notifier's API)."""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any

import typer

from edgeloop.cli.api import NOTIFIER, JsonOption, echo_json, when
from edgeloop.contracts.webhooks import EVENTS

app = typer.Typer(
    help="Webhooks: lifecycle events POSTed to a URL, HMAC-signed, retried, logged.",
    no_args_is_help=True,
)


def _sub_line(s: dict[str, Any]) -> str:
    removed = f"  removed {when(s['removed_at'])}" if s.get("removed_at") else ""
    counts = ""
    if "pending" in s:
        counts = f"  pending {s['pending']}  dead {s['dead']}"
    return (
        f"{s['subscription_id']}  {s['format']:<12} {s['url']}\n"
        f"    events {', '.join(s['events'])}{counts}{removed}"
    )


def _delivery_line(d: dict[str, Any]) -> str:
    error = f"  ({d['last_error']})" if d.get("last_error") else ""
    return (
        f"{d['delivery_id']}  {when(d['created_at'])}  {d['event']:<22} {d['status']:<9} "
        f"attempts {d['attempts']}{error}"
    )


@app.command("add")
def add(
    url: Annotated[str, typer.Option(help="http(s) URL the events are POSTed to")],
    events: Annotated[str, typer.Option(help=f"comma-separated events, of: {', '.join(EVENTS)}")],
    secret: Annotated[
        str | None,
        typer.Option(help="HMAC key of the signature (default: a new one, printed once)"),
    ] = None,
    format: Annotated[str, typer.Option("--format", help="json or alertmanager")] = "json",
    description: Annotated[str, typer.Option(help="a note for people")] = "",
    as_json: JsonOption = False,
) -> None:
    """Subscribe URL to events; every delivery is signed with the secret."""
    generated = secret is None
    key = secret or "whs_" + secrets.token_urlsafe(32)
    body = {
        "url": url,
        "events": [e.strip() for e in events.split(",") if e.strip()],
        "secret": key,
        "format": format,
        "description": description,
    }
    sub = NOTIFIER.request("POST", "/v1/subscriptions", json=body)
    if as_json:
        echo_json({**sub, **({"secret": key} if generated else {})})
        return
    typer.echo(f"subscribed {sub['subscription_id']}\n{_sub_line(sub)}")
    if generated:
        typer.echo(f"secret (shown once; the receiver checks X-Edgeloop-Signature with it): {key}")


@app.command("list")
def list_(
    removed: Annotated[bool, typer.Option(help="the removed subscriptions too")] = False,
    as_json: JsonOption = False,
) -> None:
    """Subscriptions (never their secrets), with pending and dead deliveries."""
    subs = NOTIFIER.request("GET", "/v1/subscriptions", params={"removed": removed})
    if as_json:
        echo_json(subs)
    elif not subs["subscriptions"]:
        typer.echo("no subscriptions (add one: edgeloop notify add --url URL --events …)")
    else:
        typer.echo("\n".join(_sub_line(s) for s in subs["subscriptions"]))


@app.command("remove")
def remove(
    subscription: Annotated[str, typer.Argument(help="subscription id")],
    as_json: JsonOption = False,
) -> None:
    """Remove a subscription; its pending deliveries are cancelled, its log stays."""
    sub = NOTIFIER.request("DELETE", f"/v1/subscriptions/{subscription}")
    if as_json:
        echo_json(sub)
    else:
        typer.echo(f"removed {sub['subscription_id']} ({sub['url']})")


@app.command("test")
def send_test(
    subscription: Annotated[str, typer.Argument(help="subscription id")],
    wait: Annotated[float, typer.Option(help="seconds to wait for the outcome")] = 15.0,
    as_json: JsonOption = False,
) -> None:
    """Send a test delivery (event notify.test) and show how it went; exit 1 unless it
    was delivered."""
    started = NOTIFIER.request("POST", f"/v1/subscriptions/{subscription}/test")
    path = f"/v1/deliveries/{started['delivery_id']}"
    deadline = time.monotonic() + wait
    delivery = NOTIFIER.request("GET", path)
    while delivery["status"] == "pending" and time.monotonic() < deadline:
        if delivery["attempts"] and not as_json:
            typer.echo(f"attempt {delivery['attempts']} failed: {delivery['last_error']}")
        time.sleep(0.5)
        delivery = NOTIFIER.request("GET", path)
    if as_json:
        echo_json(delivery)
    else:
        typer.echo(_delivery_line(delivery))
    if delivery["status"] != "delivered":
        raise typer.Exit(1)


@app.command("retry")
def retry(
    delivery: Annotated[str, typer.Argument(help="a dead delivery's id")],
    as_json: JsonOption = False,
) -> None:
    """Send a dead delivery again (same body, same delivery id), with another round of
    attempts: after fixing the receiver."""
    row = NOTIFIER.request("POST", f"/v1/deliveries/{delivery}/retry")
    if as_json:
        echo_json(row)
    else:
        typer.echo(
            f"retrying {row['delivery_id']} ({row['event']}, {row['attempts']} attempts so far)"
        )


@app.command("deliveries")
def deliveries(
    subscription: Annotated[str | None, typer.Argument(help="only this subscription's")] = None,
    status: Annotated[
        str | None, typer.Option(help="pending, delivered, dead or cancelled")
    ] = None,
    limit: Annotated[int, typer.Option(help="the newest N")] = 50,
    as_json: JsonOption = False,
) -> None:
    """The delivery log, newest first; dead deliveries are the ones given up."""
    params: dict[str, Any] = {"limit": limit}
    if subscription:
        params["subscription"] = subscription
    if status:
        params["status"] = status
    rows = NOTIFIER.request("GET", "/v1/deliveries", params=params)["deliveries"]
    if as_json:
        echo_json(rows)
    elif not rows:
        typer.echo("no deliveries")
    else:
        typer.echo("\n".join(_delivery_line(d) for d in rows))
