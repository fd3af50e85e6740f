"""``edgeloop data …``: the monitor's sample store — label samples, export them for
retraining (CSV or Parquet)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeloop.cli.api import MONITOR, JsonOption, echo_json
from edgeloop.contracts.parsing import parse_duration

app = typer.Typer(help="Samples the fleet sent: label them, export them.", no_args_is_help=True)


def instant(text: str | None) -> str | None:
    """``1h`` (that long ago) or an ISO time → ISO time."""
    if not text:
        return None
    try:
        return (datetime.now(UTC) - timedelta(seconds=parse_duration(text))).isoformat()
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).isoformat()
    except ValueError as exc:
        typer.secho(f"{text!r} is neither a duration (1h) nor an ISO time", err=True, fg="red")
        raise typer.Exit(2) from exc


@app.command()
def label(
    sample_id: Annotated[int, typer.Argument(help="a sample id (from data export)")],
    value: Annotated[str, typer.Argument(metavar="LABEL", help="the true label")],
    as_json: JsonOption = False,
) -> None:
    """Give a stored sample its true label."""
    r = MONITOR.request("POST", f"/v1/samples/{sample_id}/label", json={"label": value})
    if as_json:
        echo_json(r)
        return
    typer.echo(f"sample {r['sample_id']} labelled {r['label']!r} by {r['labelled_by']}")


def fetch_samples(
    model: str, since: str | None, until: str | None, kind: str
) -> list[dict[str, Any]]:
    """The samples the monitor's API gives for these filters."""
    params: dict[str, Any] = {"model": model, "kind": kind}
    if since:
        params["since"] = since
    if until:
        params["until"] = until
    return list(MONITOR.request("GET", "/v1/samples", params=params)["samples"])


def write_samples(rows: list[dict[str, Any]], out: Path) -> None:
    """``out`` as .csv or .parquet: one column per feature, then prediction, confidence,
    label and where the sample came from."""
    width = max((len(r["features"]) for r in rows), default=0)
    names = [f"f{i}" for i in range(width)]
    meta = ["prediction", "confidence", "label", "sample_id", "version", "device_id", "at"]
    table = [
        {**dict(zip(names, r["features"], strict=False)), **{k: r.get(k) for k in meta}}
        for r in rows
    ]
    if out.suffix == ".csv":
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*names, *meta])
            writer.writeheader()
            writer.writerows(table)
    elif out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {c: [row.get(c) for row in table] for c in [*names, *meta]}
        pq.write_table(pa.table(columns), out)
    else:
        typer.secho("-o must end in .csv or .parquet", err=True, fg="red")
        raise typer.Exit(2)


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="NAME")],
    out: Annotated[Path, typer.Option("--out", "-o", help="out.parquet or out.csv")],
    since: Annotated[str | None, typer.Option(help="1h (ago) or an ISO time")] = None,
    until: Annotated[str | None, typer.Option(help="1h (ago) or an ISO time")] = None,
    kind: Annotated[
        str,
        typer.Option(
            help="low-confidence, random (a share of every input), labelled (any with a "
            "label), or all"
        ),
    ] = "low-confidence",
    as_json: Annotated[bool, typer.Option("--json", help="print the rows instead")] = False,
) -> None:
    """Export stored samples for retraining."""
    if kind not in ("low-confidence", "random", "labelled", "all"):
        typer.secho("--kind is low-confidence, random, labelled or all", err=True, fg="red")
        raise typer.Exit(2)
    rows = fetch_samples(model, instant(since), instant(until), kind)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    write_samples(rows, out)
    labelled = sum(1 for r in rows if r.get("label") is not None)
    typer.echo(f"{len(rows)} samples ({labelled} labelled) → {out}")
