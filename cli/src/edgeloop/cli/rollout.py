"""``edgeloop rollout …`` and ``edgeloop rollouts list``: canary rollouts (the deployer's
API)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from edgeloop.cli.api import DEPLOYER, JsonOption, echo_json, pairs, version_ref, when
from edgeloop.contracts.parsing import (
    format_pairs,
    format_waves,
    parse_duration,
    release_policy,
    rollout_knobs,
)

app = typer.Typer(help="Roll validated versions out to device groups.", no_args_is_help=True)
list_app = typer.Typer(help="Rollouts.", no_args_is_help=True)
policy_app = typer.Typer(
    help="A model's release policy: automatic rollouts of validated versions, approval gates.",
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")

FINISHED = ("completed", "rolled_back", "aborted", "refused", "shadow_passed", "shadow_failed")
#: States a watch exits 0 on.
SUCCEEDED = ("completed", "shadow_passed")


def _fail(message: str) -> typer.Exit:
    typer.secho(message, err=True, fg="red")
    return typer.Exit(2)


@app.command()
def start(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION (a validated version)")],
    selector: Annotated[
        list[str], typer.Option("--selector", "-l", help="k=v[,k=v]: the device group")
    ],
    waves: Annotated[
        str, typer.Option(help="cumulative wave sizes: device counts and percentages")
    ] = "1,10%,50%,100%",
    bake: Annotated[str, typer.Option(help="watch time per wave once it converged")] = "30s",
    max_failures: Annotated[
        str | None,
        typer.Option(help="devices per wave that may fail or not converge: N or P%"),
    ] = None,
    converge_timeout: Annotated[
        str, typer.Option(help="how long a wave's devices have to converge")
    ] = "2m",
    device_deadline: Annotated[
        str,
        typer.Option(
            help="how long a straggler (offline or unhealthy when its wave started: given "
            "the release, not waited for) may take before it is shown stale"
        ),
    ] = "1h",
    window: WindowOption = None,
    max_unavailable: MaxUnavailableOption = None,
    shadow: Annotated[
        bool,
        typer.Option(
            "--shadow",
            help="a shadow rollout: the devices keep acting on their model and run this one "
            "beside it on the same inputs; it passes or fails on agreement, no wave follows",
        ),
    ] = False,
    shadow_first: Annotated[
        str | None,
        typer.Option(help="run a shadow phase this long first; only a pass starts the waves"),
    ] = None,
    sample: Annotated[float, typer.Option(help="share of inputs the challenger runs on")] = 0.2,
    duration: Annotated[str, typer.Option(help="how long a --shadow rollout runs")] = "1h",
    min_agreement: Annotated[
        float, typer.Option(help="the shadow phase passes at this agreement or more")
    ] = 0.9,
    min_compared: Annotated[
        int, typer.Option(help="fewer inputs compared at the end fail the shadow phase")
    ] = 100,
    max_overhead: Annotated[
        float,
        typer.Option(help="the challenger's inference time at most this x the champion's"),
    ] = 0.5,
    watch: Annotated[bool, typer.Option("--watch", help="then follow it")] = False,
    as_json: JsonOption = False,
) -> None:
    """Start a rollout; prints its id and plan (with --json and --watch: the rollout as it
    ended).

    Each wave draws online, healthy devices; offline ones are left for later waves and
    get the release with the last one, as stragglers that converge when they return.
    With --window, desired state is written only while a window is open; with
    --max-unavailable, at most that many devices of a wave activate at once.
    """
    name, version = version_ref(ref)
    body = {
        "model": name,
        "version": version,
        "selector": _selector(selector),
        **rollout_options(
            waves,
            bake,
            max_failures,
            converge_timeout,
            device_deadline=device_deadline,
            window=window,
            max_unavailable=max_unavailable,
        ),
    }
    if shadow or shadow_first:
        if shadow and shadow_first:
            raise _fail("--shadow (a shadow rollout) or --shadow-first D (then waves), not both")
        body["shadow"] = shadow_spec(
            shadow_first or duration,
            sample=sample,
            min_agreement=min_agreement,
            min_compared=min_compared,
            max_overhead=max_overhead,
            then_waves=bool(shadow_first),
        )
    r = DEPLOYER.request("POST", "/v1/rollouts", json=body)
    if as_json:
        echo_json(_watch_quietly(r["rollout_id"]) if watch else r)
        return
    typer.echo(r["rollout_id"])
    what = f"waves of {', '.join(str(n) for n in r['waves_planned'])}"
    if r.get("shadow"):
        spec = r["shadow"]
        what = f"a shadow phase of {spec['duration_seconds']:g} s (sample {spec['sample']:g})" + (
            f", then {what}" if spec["then_waves"] else ""
        )
    typer.echo(
        f"rollout of {name}@{version} to {r['devices']} devices in {what}; "
        f"follow it: edgeloop rollout status {r['rollout_id']} --watch",
        err=True,
    )
    if watch:
        _watch(r["rollout_id"])


WindowOption = Annotated[
    str | None,
    typer.Option(
        help="maintenance windows: desired state is written only while one is open, e.g. "
        "'Mon-Fri 02:00-04:00 Europe/Berlin' (several: separated by ';')"
    ),
]
MaxUnavailableOption = Annotated[
    str | None,
    typer.Option(
        help="disruption budget: N or P% of a wave's devices activating at once (given the "
        "release and not running it yet)"
    ),
]


def _selector(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        labels |= pairs(item.split(","), "--selector")
    return labels


def shadow_spec(duration: str, **spec: Any) -> dict[str, Any]:
    """A shadow phase as the API takes it."""
    try:
        return {"duration_seconds": parse_duration(duration), **spec}
    except ValueError as exc:
        raise _fail(str(exc)) from exc


def _shadow_line(r: dict[str, Any]) -> list[str]:
    spec = r.get("shadow")
    if not spec:
        return []
    phase = r.get("shadow_state") or "starting"
    line = (
        f"  shadow phase {phase}: sample {spec['sample']:g}, {spec['duration_seconds']:g} s, "
        f"passes at agreement ≥ {spec['min_agreement']:g} on ≥ {spec['min_compared']} inputs"
        + (", then the waves" if spec["then_waves"] else "")
    )
    out = [line]
    result = r.get("shadow_result") or {}
    if result:
        out.append(f"    {result['verdict']}: {result['reason']}")
    elif r.get("shadow_devices"):
        out.append(
            f"    challenger on {len(r['shadow_devices'])} devices; "
            f"edgeloop shadow report {r['model']}@{r['version']}"
        )
    return out


def rollout_options(
    waves: str | None,
    bake: str | None,
    max_failures: str | None,
    converge_timeout: str | None,
    *,
    device_deadline: str | None = None,
    window: str | None = None,
    max_unavailable: str | None = None,
) -> dict[str, Any]:
    """The wave options of a rollout (or a release policy) as the API takes them (exit 2
    with the reason when one is malformed)."""
    try:
        return rollout_knobs(
            waves,
            bake,
            max_failures,
            converge_timeout,
            device_deadline=device_deadline,
            window=window,
            max_unavailable=max_unavailable,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc


def _bar(done: int, failed: int, size: int, width: int = 24) -> str:
    if size == 0:
        return "[" + " " * width + "]"
    ok = round(width * done / size)
    bad = min(width - ok, round(width * failed / size))
    return "[" + "#" * ok + "x" * bad + "." * (width - ok - bad) + "]"


#: Stragglers named in the status view (the rest are counted).
SHOWN_STRAGGLERS = 10


def render(r: dict[str, Any]) -> str:
    """The status view of one rollout."""
    selector = ",".join(f"{k}={v}" for k, v in sorted(r["selector"].items()))
    stragglers = r.get("stragglers") or []
    late = [s for s in stragglers if s["status"] != "converged"]
    state = r["state"].upper()
    if r["state"] == "completed" and late:
        state += f" with {len(late)} straggler{'s' if len(late) > 1 else ''}"
    lines = [
        f"rollout {r['rollout_id']}  {r['model']}@{r['version']} → {selector}  {state}",
        f"  {r['devices']} devices, bake {r['bake_seconds']:g} s, converge timeout "
        f"{r['converge_timeout_seconds']:g} s, device deadline "
        f"{r.get('device_deadline_seconds', 3600):g} s, requested {when(r['created_at'])} "
        f"by {r.get('requested_by') or '-'}",
    ]
    lines += _shadow_line(r)
    waves = r.get("wave_status", []) if r["state"] not in ("shadow_passed", "shadow_failed") else []
    for w in waves:
        live = w.get("live")
        converged = live["converged"] if live else w["converged"]
        failed = (live["failed"] if live else w["failed"]) or 0
        size = w["size"] if w.get("members") is None else w["members"]
        verdict = f"  verdict {w['verdict']}" if w.get("verdict") else ""
        deferred = w.get("deferred") or 0
        last = w is waves[-1]
        passed = ""
        if deferred:  # the last wave gives them the release; earlier ones leave them
            passed = f", {deferred} {'stragglers' if last else 'offline/unhealthy passed over'}"
        lines.append(
            f"  wave {w['wave']}  {_bar(converged, failed, size)} "
            f"{converged:>5}/{size:<5} converged {failed:>4} failed (budget {w['budget']}"
            f"{passed})  {w['state']}{verdict}"
        )
        if w.get("reason"):
            lines.append(f"          {w['reason']}")
    if stragglers:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(r.get("straggler_counts", {}).items()))
        lines.append(
            f"  stragglers (given the release while offline or unhealthy; not waited for): {counts}"
        )
        for s in stragglers[:SHOWN_STRAGGLERS]:
            deadline = f"; stale at {when(s['deadline_at'])}" if s["status"] == "pending" else ""
            lines.append(f"    {s['device_id']:24} {s['text']}{deadline}")
        if len(stragglers) > SHOWN_STRAGGLERS:
            lines.append(f"    … and {len(stragglers) - SHOWN_STRAGGLERS} more (--json for all)")
    if r.get("approval_wave") is not None:
        if r.get("approved_by"):
            why = f": {r['approval_reason']}" if r.get("approval_reason") else ""
            lines.append(
                f"  approved by {r['approved_by']} {when(r['approved_at'])}{why} "
                f"(gate before wave {r['approval_wave']})"
            )
        else:
            lines.append(
                f"  waits for an approval before wave {r['approval_wave']}: "
                f"edgeloop rollout approve {r['rollout_id']} --reason …"
            )
    lines += _waits(r)
    if r.get("reason"):
        lines.append(f"  reason: {r['reason']}")
    return "\n".join(lines)


def _waits(r: dict[str, Any]) -> list[str]:
    """What the rollout waits for, each with its reason and deadline: its maintenance
    window, a disruption budget, devices whose update lock defers their activation."""
    lines = []
    if r.get("window"):
        budget = f"; max unavailable: {_cap(r)}" if _cap(r) else ""
        lines.append(f"  maintenance window: {r['window']}{budget}")
    elif _cap(r):
        lines.append(f"  max unavailable: {_cap(r)}")
    wait = r.get("waiting")
    if wait:
        lines.append(f"  waiting: {wait['reason']}; opens {when(wait['until'])}")
    for w in r.get("wave_status", []):
        if w.get("waiting"):
            until = w["waiting"].get("until")
            by = f"; a slot frees by {when(until)} at the latest" if until else ""
            lines.append(f"  wave {w['wave']} waiting: {w['waiting']['reason']}{by}")
    for d in (r.get("deferred") or [])[:SHOWN_STRAGGLERS]:
        lines.append(f"    {d['device_id']:24} {d['text']}")
    return lines


def _cap(r: dict[str, Any]) -> str:
    """``2 devices of a wave activating at once``, or "" without a disruption budget."""
    parts = []
    if r.get("max_unavailable"):
        parts.append(str(r["max_unavailable"]))
    if r.get("max_unavailable_percent"):
        parts.append(f"{r['max_unavailable_percent']:g}%")
    return " and ".join(parts) + " devices of a wave activating at once" if parts else ""


def _watch(rollout_id: str) -> None:
    shown = 0
    while True:
        r = DEPLOYER.request("GET", f"/v1/rollouts/{rollout_id}")
        text = render(r)
        if shown:
            typer.echo(f"\x1b[{shown}F\x1b[J", nl=False)  # redraw in place
        typer.echo(text)
        shown = text.count("\n") + 1
        if r["state"] in FINISHED:
            raise typer.Exit(0 if r["state"] in SUCCEEDED else 1)
        time.sleep(1)


def _watch_quietly(rollout_id: str) -> dict[str, Any]:
    """The rollout once it has ended (polled every second)."""
    while True:
        r: dict[str, Any] = DEPLOYER.request("GET", f"/v1/rollouts/{rollout_id}")
        if r["state"] in FINISHED:
            return r
        time.sleep(1)


@app.command()
def status(
    rollout_id: Annotated[str, typer.Argument()],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="follow it until it ends")] = False,
    as_json: JsonOption = False,
) -> None:
    """A rollout's waves: devices targeted, converged, failed, verdict."""
    if watch and as_json:
        echo_json(_watch_quietly(rollout_id))
        return
    if watch:
        _watch(rollout_id)
    r = DEPLOYER.request("GET", f"/v1/rollouts/{rollout_id}")
    typer.echo(json.dumps(r, indent=1) if as_json else render(r))


def _action(verb: str, rollout_id: str, reason: str | None, as_json: bool) -> None:
    r = DEPLOYER.request(
        "POST", f"/v1/rollouts/{rollout_id}/{verb}", json={"reason": reason} if reason else None
    )
    if as_json:
        echo_json(r)
        return
    typer.echo(f"rollout {rollout_id}: {r['state']}")


@app.command()
def pause(rollout_id: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Hold the rollout where it is."""
    _action("pause", rollout_id, None, as_json)


@app.command()
def resume(rollout_id: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Go on with a paused rollout."""
    _action("resume", rollout_id, None, as_json)


@app.command()
def abort(
    rollout_id: Annotated[str, typer.Argument()],
    reason: Annotated[str | None, typer.Option(help="why, for the record")] = None,
    as_json: JsonOption = False,
) -> None:
    """Stop the rollout; devices keep what they were given."""
    _action("abort", rollout_id, reason, as_json)


@app.command()
def rollback(
    rollout_id: Annotated[str, typer.Argument()],
    reason: Annotated[str | None, typer.Option(help="why, for the record")] = None,
    as_json: JsonOption = False,
) -> None:
    """Give every device the rollout touched its previous version back."""
    _action("rollback", rollout_id, reason, as_json)


@app.command()
def approve(
    rollout_id: Annotated[str, typer.Argument()],
    reason: Annotated[str | None, typer.Option(help="why, for the record")] = None,
    as_json: JsonOption = False,
) -> None:
    """Let a rollout waiting at its model's approval gate go on (not by its requester)."""
    _action("approve", rollout_id, reason, as_json)


def _policy_text(p: dict[str, Any]) -> str:
    if not p["defined"]:
        return f"{p['model']}: no release policy (rollouts are started by hand, no approval gate)"
    selector = format_pairs(p["selector"]) or "-"
    waves = format_waves(p["waves"])
    gated = format_pairs(p.get("approval_labels"))
    return "\n".join(
        [
            f"{p['model']}:",
            f"  automatic rollout of validated versions: {'on' if p['auto_rollout'] else 'off'}",
            f"  selector: {selector}",
            f"  waves: {waves or 'default (1, 10%, 50%, 100%)'}",
            f"  approval: {p['approval'].replace('_', ' ')}",
            f"  approval for any rollout to: {gated or '-'}",
            f"  maintenance window: {p.get('window') or 'any time'}",
            f"  max unavailable: {_cap(p) or '-'}",
            f"  shadow phase first: {_shadow_first(p.get('shadow_first'))}",
        ]
    )


def _shadow_first(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "-"
    return (
        f"{spec['duration_seconds']:g} s, sample {spec['sample']:g}, passes at agreement "
        f"≥ {spec['min_agreement']:g}"
    )


@policy_app.command("show")
def policy_show(
    model: Annotated[str, typer.Argument(help="model name")],
    as_json: JsonOption = False,
) -> None:
    """The model's release policy."""
    p = DEPLOYER.request("GET", f"/v1/policies/{model}")
    typer.echo(json.dumps(p, indent=1) if as_json else _policy_text(p))


@policy_app.command("set")
def policy_set(
    model: Annotated[str, typer.Argument(help="model name")],
    auto: Annotated[
        bool, typer.Option("--auto/--manual", help="roll out each validated version by itself")
    ] = False,
    selector: Annotated[
        list[str] | None, typer.Option("--selector", "-l", help="k=v: where automatic rollouts go")
    ] = None,
    waves: Annotated[str | None, typer.Option(help="e.g. 1,10%,100%")] = None,
    bake: Annotated[str | None, typer.Option(help="watch time per wave")] = None,
    max_failures: Annotated[str | None, typer.Option(help="N or P% per wave")] = None,
    converge_timeout: Annotated[str | None, typer.Option(help="per wave")] = None,
    approval: Annotated[
        str,
        typer.Option(
            help="none | before-rollout | after-first-wave: which wave waits for an approval"
        ),
    ] = "none",
    approval_labels: Annotated[
        list[str] | None,
        typer.Option(
            "--approval-labels", help="k=v: any rollout to these labels waits for an approval"
        ),
    ] = None,
    window: WindowOption = None,
    max_unavailable: MaxUnavailableOption = None,
    shadow_first: Annotated[
        str | None,
        typer.Option(
            help="every rollout first runs the version as a challenger this long; only a "
            "passing shadow phase gets a real wave"
        ),
    ] = None,
    sample: Annotated[float, typer.Option(help="with --shadow-first: share of inputs")] = 0.2,
    min_agreement: Annotated[
        float, typer.Option(help="with --shadow-first: the agreement that passes")
    ] = 0.9,
    as_json: JsonOption = False,
) -> None:
    """Set (replace) the model's release policy."""
    try:
        body = release_policy(
            auto,
            ",".join(selector or []),
            waves,
            bake,
            max_failures,
            approval=approval,
            approval_labels=",".join(approval_labels or []),
            converge_timeout=converge_timeout,
            window=window,
            max_unavailable=max_unavailable,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if shadow_first:
        body["shadow_first"] = shadow_spec(
            shadow_first, sample=sample, min_agreement=min_agreement, then_waves=True
        )
    p = DEPLOYER.request("PUT", f"/v1/policies/{model}", json=body)
    typer.echo(json.dumps(p, indent=1) if as_json else _policy_text(p))


@list_app.command("list")
def list_rollouts(
    active: Annotated[bool, typer.Option("--active", help="only rollouts in progress")] = False,
    model: Annotated[str | None, typer.Option(help="only this model's")] = None,
    limit: Annotated[int, typer.Option(help="how many")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Rollouts, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if active:
        params["state"] = "active"
    if model:
        params["model"] = model
    rows = DEPLOYER.request("GET", "/v1/rollouts", params=params)["rollouts"]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo("no rollouts")
        return
    typer.echo(f"{'ROLLOUT':36}  {'MODEL':24} {'STATE':18} {'WAVE':6} {'CREATED':19}  SELECTOR")
    for r in rows:
        ref = f"{r['model']}@{r['version']}"
        wave = f"{r['current_wave'] + 1}/{len(r['waves_planned'])}" if r["waves_planned"] else "-"
        selector = ",".join(f"{k}={v}" for k, v in sorted(r["selector"].items()))
        typer.echo(
            f"{r['rollout_id']:36}  {ref:24} {r['state']:18} {wave:6} "
            f"{when(r['created_at']):19}  {selector}"
        )
