"""``edgeloop models lineage NAME@VERSION``: where a version came from and where it went —
source commit and training data, the retraining request that caused it (its alarm and
data selection), its parent, image and signature, validation, rollouts with their waves
and approvals, and the devices running it now. Read from the registry, monitor, deployer
and gateway APIs; the audit trail (``edgeloop audit log --model NAME@V``) has who did
each step and proves it unaltered."""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

import typer

from edgeloop.cli.api import DEPLOYER, GATEWAY, MONITOR, REGISTRY, JsonOption, version_ref, when


def gather(name: str, version: str) -> dict[str, Any]:
    """Everything the platform knows of ``name@version``."""
    v = REGISTRY.request(
        "GET", f"/api/v1/models/{quote(name, safe='')}/versions/{quote(version, safe='')}"
    )
    out: dict[str, Any] = {"model": name, "version": version, "registry": v}
    request_id = v.get("retrain_request_id")
    if request_id and v.get("parent_model"):
        alarms = MONITOR.request("GET", "/v1/alarms", params={"model": v["parent_model"]})
        out["retrain_alarm"] = next(
            (a for a in alarms["alarms"] if a.get("retrain_request_id") == request_id), None
        )
    rollouts = DEPLOYER.request("GET", "/v1/rollouts", params={"model": name, "limit": 1000})
    out["rollouts"] = [r for r in rollouts["rollouts"] if r["version"] == version]
    devices = GATEWAY.request("GET", "/v1/devices", params={"limit": 10_000})["devices"]
    running = [
        d
        for d in devices
        if d.get("model") == name and d.get("version") == version and d.get("state") == "running"
    ]
    out["devices"] = [d["device_id"] for d in running]
    out["online"] = sum(1 for d in running if d.get("online"))
    return out


def render(doc: dict[str, Any]) -> str:
    """The lineage as text."""
    v = doc["registry"]
    build = v.get("build_detail") or {}
    valid = v.get("validation_detail") or {}
    parent = f"{v['parent_model']}@{v['parent_version']}" if v.get("parent_model") else "-"
    lines = [
        f"{doc['model']}@{doc['version']}",
        f"  source commit    {v.get('source_commit') or '-'}",
        f"  training data    {v.get('data_digest') or '-'}",
        f"  parent           {parent}",
        f"  registered       {when(v['created_at'])} by {v.get('created_by') or '-'}",
    ]
    alarm = doc.get("retrain_alarm")
    if v.get("retrain_request_id"):
        lines.append(f"  retrain request  {v['retrain_request_id']}")
        if alarm:
            lines.append(
                f"    caused by      alarm {alarm['alarm_id']} ({alarm['rule']}): "
                f"{alarm['message']}, window {alarm['window_start']} to {alarm['window_end']}"
            )
            lines.append(
                f"    data           edgeloop data export {v['parent_model']} "
                f"--since {alarm['window_start']} --kind all -o data.parquet"
            )
    image = f"{build.get('image') or '-'} ({build.get('digest') or v['build_state']})"
    lines += [
        f"  model            {v['model_digest']} ({v['model_size']} bytes)",
        f"  image            {image}",
        f"  signature        {build.get('signature_digest') or '-'}",
        f"  validation       {v['validation_state']}"
        + (f", report {valid.get('report_id')}" if valid.get("report_id") else "")
        + (
            "  " + ", ".join(f"{k} {x:.3g}" for k, x in sorted(valid["metrics"].items())[:4])
            if isinstance(valid.get("metrics"), dict)
            else ""
        ),
    ]
    if not doc["rollouts"]:
        lines.append("  rollouts         none")
    for r in doc["rollouts"]:
        selector = ",".join(f"{k}={x}" for k, x in sorted(r["selector"].items()))
        approved = f", approved by {r['approved_by']}" if r.get("approved_by") else ""
        lines.append(
            f"  rollout          {r['rollout_id']} to {selector}: {r['state']}, waves "
            f"{r.get('waves_planned')}, requested by {r.get('requested_by') or '-'}{approved}"
        )
    running = doc["devices"]
    shown = ", ".join(running[:10]) + (
        f" and {len(running) - 10} more" if len(running) > 10 else ""
    )
    lines.append(
        f"  running on       {len(running)} devices ({doc['online']} online)"
        + (f": {shown}" if running else "")
    )
    if v.get("trace_parent"):
        lines.append(f"  trace            edgeloop trace {doc['model']}@{doc['version']}")
    lines.append(f"  audit            edgeloop audit log --model {doc['model']}@{doc['version']}")
    return "\n".join(lines)


def lineage(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    as_json: JsonOption = False,
) -> None:
    """Where a version came from and where it went, from data to devices."""
    name, version = version_ref(ref)
    doc = gather(name, version)
    typer.echo(json.dumps(doc, indent=1, default=str) if as_json else render(doc))
