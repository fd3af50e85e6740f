"""``edgeloop models …``: register, list, show, alias — a client of the registry's API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgeloop.cli import lineage, retire
from edgeloop.cli.api import REGISTRY, pairs, valid, version_ref, when
from edgeloop.contracts.names import check_model, check_version

app = typer.Typer(help="Register model versions and look at them.", no_args_is_help=True)
alias_app = typer.Typer(help="Point aliases (champion, candidate, …) at versions.")
app.add_typer(alias_app, name="alias")

_request = REGISTRY.request
app.command("lineage")(lineage.lineage)
app.command("retire")(retire.retire)
_pairs = pairs


@app.command()
def register(
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="MODEL.onnx")],
    name: Annotated[str, typer.Option("--name", help="model name")],
    version: Annotated[str | None, typer.Option(help="version; next number when omitted")] = None,
    suite: Annotated[Path | None, typer.Option(exists=True, help="npz with X, y")] = None,
    reference: Annotated[Path | None, typer.Option(exists=True, help="npz with X")] = None,
    commit: Annotated[str | None, typer.Option(help="source commit")] = None,
    data_digest: Annotated[str | None, typer.Option(help="training data digest")] = None,
    param: Annotated[list[str] | None, typer.Option(help="k=v, repeatable")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="k=v, repeatable")] = None,
    parent: Annotated[str | None, typer.Option(help="NAME@VERSION this one derives from")] = None,
    retrain_request: Annotated[str | None, typer.Option(help="retrain request id")] = None,
) -> None:
    """Register a model version; prints the version."""
    valid(check_model, name)
    if version is not None:
        valid(check_version, version)
    files: dict[str, tuple[str, bytes]] = {"model": (model.name, model.read_bytes())}
    if suite:
        files["suite"] = (suite.name, suite.read_bytes())
    if reference:
        files["reference"] = (reference.name, reference.read_bytes())
    form = {
        k: v
        for k, v in {
            "version": version,
            "source_commit": commit,
            "data_digest": data_digest,
            "params": json.dumps(_pairs(param, "--param")),
            "tags": json.dumps(_pairs(tag, "--tag")),
            "parent": parent,
            "retrain_request_id": retrain_request,
        }.items()
        if v is not None
    }
    body = _request("POST", f"/api/v1/models/{name}/versions", data=form, files=files)
    typer.echo(body["version"])


@app.command("list")
def list_models(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every registered model."""
    models = _request("GET", "/api/v1/models")
    if json_out:
        typer.echo(json.dumps(models, indent=2))
        return
    typer.echo(f"{'MODEL':30} {'VERSIONS':>8} {'LATEST':>10}")
    for m in models:
        typer.echo(f"{m['name']:30} {m['versions']:>8} {m['latest'] or '-':>10}")


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A model's versions and aliases, or one version's lineage, artifacts and state."""
    name, _, version = ref.partition("@")
    if not version:
        body = _request("GET", f"/api/v1/models/{name}")
        if json_out:
            typer.echo(json.dumps(body, indent=2))
            return
        aliases = ", ".join(f"{a}→{v}" for a, v in body["aliases"].items()) or "none"
        typer.echo(f"model {name}  aliases: {aliases}")
        typer.echo(f"{'VERSION':>8}  {'BUILD':8} {'VALIDATION':10} {'COMMIT':12} CREATED")
        for v in body["versions"]:
            typer.echo(
                f"{v['version']:>8}  {v['build_state']:8} {v['validation_state']:10} "
                f"{(v['source_commit'] or '-')[:12]:12} {v['created_at']}"
            )
        return
    v = _request("GET", f"/api/v1/models/{name}/versions/{version}")
    if json_out:
        typer.echo(json.dumps(v, indent=2))
        return
    parent = f"{v['parent_model']}@{v['parent_version']}" if v.get("parent_model") else "-"
    lines = [
        f"{name}@{version}",
        f"  aliases        {', '.join(v['aliases']) or '-'}",
        f"  source commit  {v['source_commit'] or '-'}",
        f"  data digest    {v['data_digest'] or '-'}",
        f"  parent         {parent}",
        f"  params         {json.dumps(v['params'])}",
        f"  tags           {json.dumps(v['tags'])}",
        f"  model          {v['model_digest']} ({v['model_size']} bytes)",
        f"  suite          {v['suite_digest'] or '-'}",
        f"  reference      {v['reference_digest'] or '-'}",
        f"  repository     {v['repository']} (manifest {v['artifact_manifest']})",
        f"  build          {v['build_state']} {json.dumps(v['build_detail'] or {})}",
        f"  validation     {v['validation_state']} {json.dumps(v['validation_detail'] or {})}",
        f"  registered     {v['created_at']} by {v['created_by'] or '-'}",
        f"  stage          {v.get('stage', 'active')}"
        + (f" ({v['stage_reason']})" if v.get("stage_reason") else ""),
    ]
    if v.get("retired_at"):
        archive = "archived" if v.get("archived_at") else "to be archived"
        lines.append(f"  retired        {when(v['retired_at'])}, {archive} {when(v['archive_at'])}")
    if v.get("trace_parent"):
        trace_id = v["trace_parent"].split("-")[1]
        lines.append(f"  trace          {trace_id}  (edgeloop trace {name}@{version})")
    typer.echo("\n".join(lines))
    if v.get("stage", "active") != "active":
        typer.secho(
            f"warning: {name}@{version} is {v['stage']}: new rollouts of it are refused",
            err=True,
            fg="yellow",
        )


@app.command()
def deprecate(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    reason: Annotated[str | None, typer.Option(help="why, for the record")] = None,
) -> None:
    """Deprecate a version: new rollouts are refused; devices running it keep it."""
    name, version = version_ref(ref)
    v = _request(
        "POST",
        f"/api/v1/models/{name}/versions/{version}/deprecate",
        json={"reason": reason} if reason else None,
    )
    typer.echo(f"{name}@{version}: {v['stage']}")


validations_app = typer.Typer(help="Validation reports.", no_args_is_help=True)


@validations_app.command("show")
def validations_show(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A version's validation report: verdict, reasons, metrics, champion, profile."""
    name, version = version_ref(ref)
    v = _request("GET", f"/api/v1/models/{name}/versions/{version}")
    detail = v.get("validation_detail") or {}
    report = detail.get("report") or {}
    if json_out:
        typer.echo(json.dumps({"state": v["validation_state"], **report}, indent=2))
        return
    typer.echo(f"{name}@{version}: validation {v['validation_state']}  (build {v['build_state']})")
    if v["build_state"] == "failed":
        typer.echo(f"  build failed: {(v.get('build_detail') or {}).get('reason')}")
    for reason in report.get("reasons", detail.get("reasons", [])):
        typer.echo(f"  ✗ {reason}")
    for metric, value in sorted((report.get("metrics") or {}).items()):
        typer.echo(f"  {metric:24} {value:.4f}")
    champion = report.get("champion")
    if champion:
        typer.echo(f"  champion: version {champion['version']}")
        for metric, pair in champion["metrics"].items():
            typer.echo(
                f"    {metric:22} candidate {pair['candidate']:.4f}  "
                f"champion {pair['champion']:.4f}"
            )
    prof = report.get("profile")
    if prof:
        typer.echo("  latency (single row)   threads  p50 ms  p95 ms  p99 ms  memory MB")
        for n, r in sorted(prof["threads"].items(), key=lambda kv: int(kv[0])):
            typer.echo(
                f"  {'':22} {n:>7} {r['p50_ms']:7.3f} {r['p95_ms']:7.3f} "
                f"{r['p99_ms']:7.3f} {r['memory_mb']:10.1f}"
            )
        typer.echo(
            f"  recommended: {prof['recommended_threads']} thread(s), memory limit "
            f"{prof['recommended_memory_limit_mb']} MB"
        )
    if v["validation_state"] == "passed":
        typer.echo(
            f"  image {(v.get('build_detail') or {}).get('image')}:"
            f"{detail.get('validated_tag')} ({detail.get('digest')})"
        )


@alias_app.command("set")
def alias_set(name: str, alias: str, version: str) -> None:
    """Point ALIAS of NAME at VERSION."""
    _request("PUT", f"/api/v1/models/{name}/aliases/{alias}", json={"version": version})
    typer.echo(f"{name}: {alias} → {version}")
