"""Parsers of the forms people write in, shared by the CLI and the console (durations,
wave plans, selectors, release policies, monitor rules), and their inverses."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from edgeloop.contracts.events import WavePlan
from edgeloop.contracts.windows import parse_window

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """``500ms``, ``10s``, ``2m``, ``1h`` or plain seconds → seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"invalid duration {text!r}: use e.g. 500ms, 10s, 2m, 1h")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def parse_waves(text: str) -> list[WavePlan]:
    """``1,10%,50%,100%`` → wave plans (device counts or percentages, cumulative)."""
    waves: list[WavePlan] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if part.endswith("%"):
                waves.append(WavePlan(percent=float(part[:-1])))
            else:
                waves.append(WavePlan(count=int(part)))
        except ValueError as exc:
            raise ValueError(
                f"invalid wave {part!r} in {text!r}: use device counts and percentages, "
                "e.g. 1,10%,50%,100%"
            ) from exc
    if not waves:
        raise ValueError("a rollout needs at least one wave, e.g. 1,10%,50%,100%")
    return waves


def parse_pairs(items: Iterable[str], what: str) -> dict[str, str]:
    """``k=v`` items → a dict (blank items skipped); ValueError naming ``what`` on an
    item without ``=`` or a key."""
    out: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} takes key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_selector(text: str, what: str = "the selector") -> dict[str, str]:
    """``k=v[,k=v]`` → a label selector (ValueError when malformed)."""
    return parse_pairs(text.split(","), what)


def parse_share(text: str, field: str, what: str) -> dict[str, float | int]:
    """``N`` or ``P%`` as the API's ``field`` or ``field_percent`` (``what``: the option
    named in the error)."""
    try:
        if text.endswith("%"):
            return {f"{field}_percent": float(text[:-1])}
        return {field: int(text)}
    except ValueError:
        raise ValueError(
            f"invalid {what} {text!r}: use a device count or a percentage, e.g. 2 or 10%"
        ) from None


def rollout_knobs(
    waves: str | None,
    bake: str | None,
    max_failures: str | None,
    converge_timeout: str | None,
    *,
    device_deadline: str | None = None,
    window: str | None = None,
    max_unavailable: str | None = None,
) -> dict[str, Any]:
    """A rollout's (or a release policy's) wave options, as the people's forms write them
    (``1,10%,100%``, ``30s``, ``2`` or ``10%``), in the shape the deployer's API takes;
    options that are None or empty are left out. ValueError names the malformed one."""
    body: dict[str, Any] = {}
    if window:
        body["window"] = parse_window(window).text
    if max_unavailable:
        body |= parse_share(max_unavailable, "max_unavailable", "--max-unavailable")
    if device_deadline:
        body["device_deadline_seconds"] = parse_duration(device_deadline)
    if waves:
        body["waves"] = [w.model_dump(exclude_none=True) for w in parse_waves(waves)]
    if bake:
        body["bake_seconds"] = parse_duration(bake)
    if converge_timeout:
        body["converge_timeout_seconds"] = parse_duration(converge_timeout)
    if max_failures:
        body |= parse_share(max_failures, "max_failures", "--max-failures")
    return body


#: Which wave of a model's rollouts waits for an approval (a release policy's ``approval``).
APPROVALS = ("none", "before_rollout", "after_first_wave")


def release_policy(
    auto_rollout: bool,
    selector: str,
    waves: str | None,
    bake: str | None,
    max_failures: str | None,
    *,
    approval: str = "none",
    approval_labels: str = "",
    converge_timeout: str | None = None,
    window: str | None = None,
    max_unavailable: str | None = None,
) -> dict[str, Any]:
    """A release policy as people write it (``k=v[,k=v]`` selectors, ``1,10%,100%``,
    ``30s``, ``2`` or ``10%``, ``before-rollout``) → the deployer's ``PUT
    /v1/policies/{model}`` body. ValueError names the malformed field."""
    gate = approval.strip().replace("-", "_") or "none"
    if gate not in APPROVALS:
        raise ValueError(f"approval is none, before-rollout or after-first-wave, not {approval!r}")
    return {
        "auto_rollout": auto_rollout,
        "selector": parse_selector(selector) or None,
        "approval": gate,
        "approval_labels": parse_selector(approval_labels, "the approval labels") or None,
        **rollout_knobs(
            waves,
            bake,
            max_failures,
            converge_timeout,
            window=window,
            max_unavailable=max_unavailable,
        ),
    }


def format_pairs(pairs: dict[str, str] | None) -> str:
    """A selector as people write it: ``k=v,k=v`` (sorted; empty for none)."""
    return ",".join(f"{k}={v}" for k, v in sorted((pairs or {}).items()))


def format_waves(waves: list[dict[str, Any]] | None) -> str:
    """Wave plans as people write them: ``1, 10%, 100%`` (empty for none)."""
    return ", ".join(
        f"{w['percent']:g}%" if w.get("percent") is not None else str(w["count"])
        for w in waves or []
    )


def parse_rules(text: str, source: str = "the rules") -> dict[str, Any]:
    """A model's monitor rules as YAML (``rule: number`` lines; ``kpis:`` a mapping) →
    the mapping the monitor's ``PUT /v1/rules/{model}`` takes (empty text: none).
    ValueError, naming ``source``, when it is no YAML mapping; the monitor checks the
    names and values."""
    # PyYAML only here: the edge agent imports this module and does not install it.
    import yaml

    try:
        rules = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{source} are not YAML: {exc}") from exc
    if not isinstance(rules, dict):
        raise ValueError(f"{source} must be a mapping of rule: number, e.g. prediction_psi: 0.6")
    return rules


def format_rules(rules: dict[str, Any]) -> str:
    """Rules as YAML, as :func:`parse_rules` reads them (empty for none)."""
    import yaml

    return yaml.safe_dump(rules, sort_keys=True).rstrip() if rules else ""
