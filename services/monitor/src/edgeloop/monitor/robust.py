"""One device cannot raise an alarm or fail a canary: evidence from several devices, and
per-device outliers trimmed.

A window keeps each device's part (``Window.by_device``). A rule firing on a window, or a
canary failing against its baseline, must

1. rest on at least ``min_devices`` devices (on each side of a canary comparison), and
2. still hold without any single device (leave-one-out: the others' evidence alone must
   reach ``min_count`` and fire too).

A device without which it would not hold is an outlier: it is **trimmed** (the judgement
is made without it), named (in the window's scores, in the ``CanaryVerdict``) and counted
for the device as ``implausible`` (``GET /v1/rejections``, ``edgeloop devices show``).
Leave-one-out costs one scoring per device of the window, paid only when something
fires, which is rare.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from edgeloop.kit.db import Conn
from edgeloop.monitor.aggregate import Reference, Window
from edgeloop.monitor.rules import DEFAULT_RULES, Judgement, judge, score


def judge_window(
    window: Window, ref: Reference, rules: dict[str, Any]
) -> tuple[dict[str, Any], list[Judgement], dict[str, str]]:
    """Scores, judgements and trimmed devices (device → why) of a window: a rule that
    fires on too few devices, or only with one device, is held (neither firing nor
    clean)."""
    r = {**DEFAULT_RULES, **rules}
    scores = score(window, ref)
    judgements = judge(scores, r)
    fired = {j.rule for j in judgements if j.fired}
    if not fired:
        return scores, judgements, {}
    n = len(window.devices)
    held: dict[str, str] = {}
    trimmed: dict[str, str] = {}
    if n < r["min_devices"]:
        held = dict.fromkeys(fired, f"evidence from {n} device(s), {r['min_devices']:g} needed")
    else:
        for device in sorted(window.by_device):
            if not fired - held.keys():
                break
            without = score(window.without({device}), ref)
            still = {j.rule for j in judge(without, r) if j.fired}
            alone = sorted(fired - held.keys() - still)
            if alone:
                trimmed[device] = f"alone makes {', '.join(alone)} fire"
                held |= dict.fromkeys(alone, f"fires only with device {device}")
    if held:
        judgements = [
            replace(j, fired=False, clean=False, message=f"{j.message} (held: {held[j.rule]})")
            if j.rule in held
            else j
            for j in judgements
        ]
        scores = {**scores, "held": held, "trimmed_devices": trimmed}
    return scores, judgements, trimmed


async def record_rejection(conn: Conn, device_id: str, code: str, reason: str) -> None:
    """Count a refused batch or an implausible window for the device."""
    await conn.execute(
        """INSERT INTO rejections (device_id, code, count, last_reason) VALUES ($1, $2, 1, $3)
           ON CONFLICT (device_id, code) DO UPDATE
           SET count = rejections.count + 1, last_reason = EXCLUDED.last_reason,
               last_at = now()""",
        device_id,
        code,
        reason[:1000],
    )
