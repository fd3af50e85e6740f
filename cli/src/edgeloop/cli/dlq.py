"""``edgeloop dlq list|show|replay``: the dead letters, to inspect and to replay.

The DLQ is read and replayed on NATS (the stack's ``nats_url``, the admin's); each
replay is recorded in the audit trail through the registry's API with the caller's
token (``dlq.replay``: operator, admin), before anything is published. The kit's DLQ
module is imported where it is used: it brings FastStream, which other commands need not
load.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from nats.aio.client import Client
from nats.js import JetStreamContext

from edgeloop.cli.api import REGISTRY, JsonOption, when
from edgeloop.cli.config import ENV_NATS_URL, load_endpoints
from edgeloop.cli.data import instant
from edgeloop.cli.health import describe, nats_connect
from edgeloop.contracts.stackfile import redact

if TYPE_CHECKING:
    from edgeloop.kit import dlq

app = typer.Typer(
    help="Dead letters: what a consumer could not process, with why; inspect and replay.",
    no_args_is_help=True,
)

T = TypeVar("T")


def _on_nats(work: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    """Run ``work`` with a JetStream context on the stack's NATS (exit 1 if unreachable)."""
    url = load_endpoints().nats_url
    if not url:
        typer.secho(
            f"no NATS URL: set {ENV_NATS_URL} or run `make up` (it writes stack.json)",
            err=True,
            fg="red",
        )
        raise typer.Exit(2)

    async def run() -> T:
        try:
            nc: Client = await nats_connect(url)
        except Exception as exc:
            typer.secho(f"NATS at {redact(url)}: {describe(exc)}", err=True, fg="red")
            raise typer.Exit(1) from exc
        try:
            return await work(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


def _since(text: str | None) -> datetime | None:
    iso = instant(text)
    return datetime.fromisoformat(iso) if iso else None


def _line(d: dlq.DeadLetter) -> str:
    reason = d.reason if len(d.reason) <= 80 else d.reason[:77] + "..."
    return (
        f"{d.id:>6}  {when(d.at.isoformat())}  {d.subject:<36} {d.consumer:<22} "
        f"{d.deliveries:>3}  {d.event_id or '-':<36}  {reason}"
    )


@app.command("list")
def list_(
    subject: Annotated[
        str, typer.Option(help="the original subject (wildcards * and > allowed)")
    ] = ">",
    since: Annotated[str | None, typer.Option(help="1h (ago) or an ISO time")] = None,
    limit: Annotated[int, typer.Option(help="the newest N")] = 200,
    as_json: JsonOption = False,
) -> None:
    """Dead letters, oldest first: id, when, subject, consumer, deliveries, event, reason."""
    from edgeloop.kit import dlq

    letters = _on_nats(lambda js: dlq.read(js, subject, since=_since(since), limit=limit))
    if as_json:
        typer.echo(json.dumps([d.summary() for d in letters], indent=1))
    elif not letters:
        typer.echo("no dead letters")
    else:
        typer.echo(
            f"{'ID':>6}  {'DEAD-LETTERED':<19}  {'SUBJECT':<36} {'CONSUMER':<22} "
            f"{'DLV':>3}  {'EVENT':<36}  REASON"
        )
        typer.echo("\n".join(_line(d) for d in letters))


async def _get(js: JetStreamContext, dead_letter_id: int) -> dlq.DeadLetter:
    from edgeloop.kit import dlq

    try:
        return await dlq.get(js, dead_letter_id)
    except dlq.UnknownDeadLetter as exc:
        typer.secho(f"{exc} (replayed, dropped, or never there)", err=True, fg="red")
        raise typer.Exit(1) from exc


@app.command("show")
def show(
    dead_letter_id: Annotated[int, typer.Argument(metavar="ID", help="from `dlq list`")],
    as_json: JsonOption = False,
) -> None:
    """One dead letter: why, where it came from, its headers and its payload."""
    letter = _on_nats(lambda js: _get(js, dead_letter_id))
    body = letter.as_dict()
    if as_json:
        typer.echo(json.dumps(body, indent=1))
        return
    for key in ("id", "subject", "consumer", "reason", "stream_seq", "deliveries", "at"):
        typer.echo(f"{key + ':':<12}{body[key]}")
    typer.echo(f"{'event:':<12}{letter.event_id or '- (the payload has no event id)'}")
    typer.echo("headers:")
    for key, value in sorted(letter.headers.items()):
        typer.echo(f"  {key}: {value}")
    payload = body["payload"]
    typer.echo("payload:")
    typer.echo(json.dumps(payload, indent=1) if not isinstance(payload, str) else payload)


async def _select(
    js: JetStreamContext, subject: str | None, ids: list[int]
) -> list[dlq.DeadLetter]:
    from edgeloop.kit import dlq

    if ids:
        return [await _get(js, i) for i in dict.fromkeys(ids)]
    return await dlq.read(js, subject or ">")


def _report(replays: list[dlq.Replay]) -> None:
    """Audit ``replays`` through the registry (exit 1 if it refuses: nothing more is done)."""
    if replays:
        body = {"replays": [r.record() for r in replays]}
        REGISTRY.request("POST", "/api/v1/dlq/replays", json=body)


def _describe(r: dlq.Replay) -> str:
    event = f"event {r.letter.event_id}" if r.letter.event_id else "(no event id)"
    return f"#{r.letter.id} {r.letter.subject} {event} for {r.letter.consumer}"


async def _replay(
    js: JetStreamContext,
    letters: list[dlq.DeadLetter],
    timeout: float,  # noqa: ASYNC109 (a budget for the acknowledgements, not for one call)
) -> list[dlq.Replay]:
    from edgeloop.kit import dlq

    replays = [dlq.Replay(d) for d in letters]
    await dlq.check_consumers(js, replays)
    _report(replays)  # before anything is published: every replay is on the record
    published = [r for r in replays if r.outcome == dlq.REPLAYING]
    for r in published:
        try:
            await dlq.publish(js, r)
        except Exception as exc:
            r.outcome = dlq.FAILED
            r.detail = f"not replayed: the publish failed ({describe(exc)}); still in the DLQ"
    await dlq.settle(js, published, timeout=timeout)
    _report(published)  # before deleting: an acknowledged replay's removal is no drop
    for r in published:
        if r.outcome in dlq.REMOVED:
            await dlq.remove(js, r)
    return replays


@app.command("replay")
def replay(
    subject: Annotated[
        str | None, typer.Option(help="every dead letter of this original subject ('>': all)")
    ] = None,
    ids: Annotated[
        list[int] | None, typer.Option("--id", help="a dead letter's id (repeatable)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="say what would be replayed; change nothing")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="seconds to wait for the consumers' acknowledgements")
    ] = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Republish dead letters to their subjects, with their event ids (the consumer's inbox
    keeps the effect exactly-once); each leaves the DLQ once its consumer acknowledged it.

    Exit status: 0 when every replay was acknowledged, 1 otherwise (those stay in the DLQ).
    """
    from edgeloop.kit import dlq

    if bool(subject) == bool(ids):
        typer.secho(
            "give --subject S (--subject '>' for every dead letter) or --id ID…, not both",
            err=True,
            fg="red",
        )
        raise typer.Exit(2)
    letters = _on_nats(lambda js: _select(js, subject, ids or []))
    if not letters:
        typer.echo("no dead letters to replay")
        return
    if dry_run:
        for d in letters:
            typer.echo(f"would replay {_describe(dlq.Replay(d))} to {d.subject}")
        return
    replays = _on_nats(lambda js: _replay(js, letters, timeout))
    if as_json:
        typer.echo(json.dumps([r.record() for r in replays], indent=1))
    else:
        for r in replays:
            typer.echo(f"{_describe(r)}: {r.detail}")
    if any(r.outcome != dlq.ACKED for r in replays):
        raise typer.Exit(1)
