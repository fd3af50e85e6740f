"""Parsers of the command-line forms every component shares (durations, wave plans)."""

from __future__ import annotations

import re

from edgeloop.contracts.events import WavePlan

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
