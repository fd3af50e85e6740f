"""``edgeloop models …``: register, list, show, alias — a client of the registry's API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeloop.cli import lineage, retire
from edgeloop.cli.api import REGISTRY, JsonOption, echo_json, pairs, valid, version_ref, when
from edgeloop.cli.upload import (
    FileChanged,
    FilePart,
    MultipartFiles,
    progress_console,
    upload_progress,
)
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
    json_out: JsonOption = False,
) -> None:
    """Register a model version; prints the version."""
    valid(check_model, name)
    if version is not None:
        valid(check_version, version)
    console = progress_console(json_out)
    fields = {"model": model, "suite": suite, "reference": reference}
    files = [FilePart(field, path) for field, path in fields.items() if path is not None]
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
    # streamed from disk: a model of a gigabyte needs no gigabyte of memory here
    upload = MultipartFiles(form, files)
    names = {f.field: f.path.name for f in files}
    try:
        with upload_progress(upload, console, names=names, waiting="sent; the registry checks it"):
            body = _request(
                "POST", f"/api/v1/models/{name}/versions", content=upload, headers=upload.headers
            )
    except FileChanged as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(1) from None
    if json_out:
        echo_json(body)
        return
    typer.echo(body["version"])


@app.command("list")
def list_models(json_out: JsonOption = False) -> None:
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
    json_out: JsonOption = False,
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
    typer.echo(render_version(name, version, v))
    if v.get("stage", "active") != "active":
        typer.secho(
            f"warning: {name}@{version} is {v['stage']}: new rollouts of it are refused",
            err=True,
            fg="yellow",
        )


def _row(label: str, value: object) -> str:
    return f"  {label:14} {value}"


def _flat(d: dict[str, Any] | None, prefix: str = "") -> str:
    """``k=v, k2=v2`` (nested mappings as ``k.sub=v``; "-" when empty)."""
    items: list[str] = []
    for key, value in sorted((d or {}).items()):
        if isinstance(value, dict):
            items.append(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            items.append(f"{prefix}{key}=" + ",".join(str(x) for x in value))
        else:
            items.append(f"{prefix}{key}={value}")
    return ", ".join(i for i in items if i and i != "-") or "-"


def _mib(size: object) -> str:
    if not isinstance(size, int):
        return "-"
    if size < 1 << 20:
        return f"{size} bytes ({size / 1024:.1f} KiB)"
    return f"{size} bytes ({size / (1 << 20):.1f} MiB)"


def _tensor(t: dict[str, Any]) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in t.get("shape") or [])
    return f"{t.get('name')} {t.get('type')} [{dims}]"


def image_ref(v: dict[str, Any]) -> str | None:
    """The version's image as a pullable, immutable ``repository@sha256:…`` (None until
    it is built)."""
    build = v.get("build_detail") or {}
    if v.get("build_state") != "built" or not build.get("image") or not build.get("digest"):
        return None
    return f"{build['image']}@{build['digest']}"


def render_version(name: str, version: str, v: dict[str, Any]) -> str:
    """``models show NAME@V`` for people: the version, its artifacts, the model's
    signature, the build (with the pullable image), the validation and the latency
    profile, one section each."""
    parent = f"{v['parent_model']}@{v['parent_version']}" if v.get("parent_model") else "-"
    stage = v.get("stage", "active") + (f" ({v['stage_reason']})" if v.get("stage_reason") else "")
    lines = [
        f"{name}@{version}",
        _row("stage", stage),
        _row("aliases", ", ".join(v["aliases"]) or "-"),
        _row("registered", f"{when(v['created_at'])} by {v['created_by'] or '-'}"),
        _row("source commit", v["source_commit"] or "-"),
        _row("data digest", v["data_digest"] or "-"),
        _row("parent", parent),
        _row("params", _flat(v["params"])),
        _row("tags", _flat(v["tags"])),
    ]
    if v.get("retired_at"):
        archive = "archived" if v.get("archived_at") else "to be archived"
        lines.append(_row("retired", f"{when(v['retired_at'])}, {archive} {when(v['archive_at'])}"))
    if v.get("trace_parent"):
        trace_id = v["trace_parent"].split("-")[1]
        lines.append(_row("trace", f"{trace_id}  (edgeloop trace {name}@{version})"))
    lines += [
        "",
        "artifacts",
        _row("repository", v["repository"]),
        _row("manifest", v["artifact_manifest"]),
        _row("model", f"{v['model_digest']}, {_mib(v['model_size'])}"),
        _row("suite", v["suite_digest"] or "-"),
        _row("reference", v["reference_digest"] or "-"),
    ]
    signature = v.get("signature") or {}
    lines += ["", f"signature      {signature.get('kind') or '-'}"]
    for key in ("inputs", "outputs"):
        tensors = signature.get(key) or []
        lines.append(_row(key, "; ".join(_tensor(t) for t in tensors) or "-"))
    lines += ["", *_build_lines(v)]
    lines += ["", *validation_lines(v)]
    return "\n".join(lines)


def _build_lines(v: dict[str, Any]) -> list[str]:
    build = v.get("build_detail") or {}
    state = v["build_state"]
    lines = [f"build          {state}" + (f" ({build['backend']})" if build.get("backend") else "")]
    ref = image_ref(v)
    if ref:
        lines.append(_row("image", f"{ref}  (pullable)"))
        lines.append(_row("size", _mib(build.get("size"))))
        signed = build.get("signature_digest")
        lines.append(_row("signed", f"yes (signature {signed})" if signed else "no"))
    elif state == "failed":
        attempts = f" after {build['attempts']} attempts" if build.get("attempts") else ""
        lines.append(_row("reason", f"{build.get('reason') or '-'}{attempts}"))
    return lines


def validation_lines(v: dict[str, Any]) -> list[str]:
    """The validation section: verdict, reasons, metrics against their thresholds, the
    comparison with the champion, the validated tag and the latency profile."""
    detail = v.get("validation_detail") or {}
    report = detail.get("report") or {}
    lines = [f"validation     {v['validation_state']}"]
    for reason in report.get("reasons", detail.get("reasons", [])):
        lines.append(f"  ✗ {reason}")
    thresholds = report.get("thresholds") or {}
    metrics = report.get("metrics") or detail.get("metrics") or {}
    if metrics:
        lines.append("  metrics")
    for metric, value in sorted(metrics.items()):
        bound = f"  (threshold {thresholds[metric]:g})" if metric in thresholds else ""
        lines.append(f"    {metric:22} {value:.4f}{bound}")
    champion = report.get("champion")
    if champion:
        lines.append(f"  against the champion (version {champion['version']})")
        for metric, pair in champion["metrics"].items():
            lines.append(
                f"    {metric:22} candidate {pair['candidate']:.4f}  "
                f"champion {pair['champion']:.4f}"
            )
    if v["validation_state"] == "passed":
        build = v.get("build_detail") or {}
        lines.append(_row("validated as", f"{build.get('image')}:{detail.get('validated_tag')}"))
    prof = report.get("profile")
    lines += ["", *profile_lines(prof)] if prof else []
    return lines


def profile_lines(prof: dict[str, Any]) -> list[str]:
    """The latency profile: single-row latency and memory per thread count, and the
    recommendation."""
    lines = [
        "latency profile (single row)",
        "  threads   p50 ms   p95 ms   p99 ms  memory MB",
    ]
    for n, r in sorted(prof["threads"].items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"  {n:>7} {r['p50_ms']:8.3f} {r['p95_ms']:8.3f} {r['p99_ms']:8.3f} "
            f"{r['memory_mb']:10.1f}"
        )
    lines.append(
        f"  recommended: {prof['recommended_threads']} thread(s), memory limit "
        f"{prof['recommended_memory_limit_mb']} MB"
    )
    return lines


@app.command()
def deprecate(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    reason: Annotated[str | None, typer.Option(help="why, for the record")] = None,
    json_out: JsonOption = False,
) -> None:
    """Deprecate a version: new rollouts are refused; devices running it keep it."""
    name, version = version_ref(ref)
    v = _request(
        "POST",
        f"/api/v1/models/{name}/versions/{version}/deprecate",
        json={"reason": reason} if reason else None,
    )
    if json_out:
        echo_json(v)
        return
    typer.echo(f"{name}@{version}: {v['stage']}")


validations_app = typer.Typer(help="Validation reports.", no_args_is_help=True)


@validations_app.command("show")
def validations_show(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    json_out: JsonOption = False,
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
    typer.echo("\n".join(validation_lines(v)[1:]))


@alias_app.command("set")
def alias_set(name: str, alias: str, version: str, json_out: JsonOption = False) -> None:
    """Point ALIAS of NAME at VERSION."""
    body = _request("PUT", f"/api/v1/models/{name}/aliases/{alias}", json={"version": version})
    if json_out:
        echo_json(body)
        return
    typer.echo(f"{name}: {alias} → {version}")
