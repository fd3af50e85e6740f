"""Shadow (challenger) comparisons: what a challenger's batches say, kept apart from the
model's windows, and the report per device group.

A challenger's batch (``TelemetryBatch.shadow`` set) carries the challenger's outputs on
inputs the champion also ran on, and the comparison: how many agreed, the flips
champion → challenger, the champion's predictions and latencies on the same rows. They
add up per (challenger version, shadow rollout, group, champion version) in
``shadow_comparisons``, merged under the row's lock (the consumer's inbox makes a
redelivered batch count once). The report gives per group and over all groups:

- **agreement**: agreed / compared;
- **flip matrix**: champion class → challenger class → count (the diagonal is the
  agreement per class: the champion's predictions of a class less its flips);
- **latency ratio**: challenger / champion p50 and p99 (on the same rows);
- **prediction drift**: PSI of the challenger's prediction distribution against the
  champion's on the same inputs;
- the budget: inputs sampled out, sampled inputs skipped over budget, the overhead last
  reported (challenger time / champion time).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from edgeloop.contracts.events import LATENCY_MS_EDGES, Histogram, TelemetryBatch
from edgeloop.kit.consumer import Tx
from edgeloop.kit.db import Conn
from edgeloop.monitor.aggregate import BadTelemetry, Reference, check, quantile
from edgeloop.monitor.drift import psi

Key = tuple[str, str, str, str, str]
"""(model, version, rollout id or '', group, champion version)"""


class Comparison:
    """Running totals of one key (JSON-ready both ways)."""

    def __init__(self) -> None:
        self.compared = 0
        self.agreed = 0
        self.sampled_out = 0
        self.skipped_budget = 0
        self.flips: dict[str, dict[str, int]] = {}
        self.champion: dict[str, int] = {}
        self.challenger: dict[str, int] = {}
        n = len(LATENCY_MS_EDGES) + 1
        self.champion_latency = [0] * n
        self.challenger_latency = [0] * n
        self.devices: dict[str, int] = {}
        self.overhead: dict[str, float] = {}
        """The latest overhead each device reported."""

    def add(self, batch: TelemetryBatch) -> None:
        """One challenger batch."""
        c = batch.shadow
        assert c is not None
        self.compared += c.compared
        self.agreed += c.agreed
        self.sampled_out += c.sampled_out
        self.skipped_budget += c.skipped_budget
        for f in c.flips:
            row = self.flips.setdefault(f.champion, {})
            row[f.challenger] = row.get(f.challenger, 0) + f.count
        _add_counts(self.champion, c.champion_prediction_counts)
        _add_counts(self.challenger, batch.prediction_counts)
        _add_latency(self.champion_latency, c.champion_latency_ms_histogram)
        _add_latency(self.challenger_latency, batch.latency_ms_histogram)
        self.devices[batch.device_id] = self.devices.get(batch.device_id, 0) + c.compared
        self.overhead[batch.device_id] = c.overhead

    def merge(self, other: Comparison) -> None:
        """Add ``other``'s totals."""
        self.compared += other.compared
        self.agreed += other.agreed
        self.sampled_out += other.sampled_out
        self.skipped_budget += other.skipped_budget
        for a, row in other.flips.items():
            _add_counts(self.flips.setdefault(a, {}), row)
        _add_counts(self.champion, other.champion)
        _add_counts(self.challenger, other.challenger)
        for mine, theirs in (
            (self.champion_latency, other.champion_latency),
            (self.challenger_latency, other.challenger_latency),
        ):
            for i, n in enumerate(theirs[: len(mine)]):
                mine[i] += n
        _add_counts(self.devices, other.devices)
        self.overhead.update(other.overhead)

    def aggregate_json(self) -> dict[str, Any]:
        """What the ``aggregate`` column holds (the counters have columns of their own)."""
        return {
            "flips": self.flips,
            "champion": self.champion,
            "challenger": self.challenger,
            "champion_latency": self.champion_latency,
            "challenger_latency": self.challenger_latency,
            "devices": self.devices,
            "overhead": self.overhead,
        }

    @classmethod
    def from_row(cls, row: Any) -> Comparison:
        """From a ``shadow_comparisons`` row."""
        out = cls()
        out.compared = int(row["compared"])
        out.agreed = int(row["agreed"])
        out.sampled_out = int(row["sampled_out"])
        out.skipped_budget = int(row["skipped_budget"])
        agg = row["aggregate"]
        agg = json.loads(agg) if isinstance(agg, str) else dict(agg or {})
        out.flips = {a: dict(r) for a, r in agg.get("flips", {}).items()}
        out.champion = dict(agg.get("champion", {}))
        out.challenger = dict(agg.get("challenger", {}))
        out.champion_latency = list(agg.get("champion_latency", out.champion_latency))
        out.challenger_latency = list(agg.get("challenger_latency", out.challenger_latency))
        out.devices = dict(agg.get("devices", {}))
        out.overhead = dict(agg.get("overhead", {}))
        return out

    def report(self) -> dict[str, Any]:
        """The figures of these totals."""
        classes = sorted(set(self.champion) | set(self.challenger))
        matrix: dict[str, dict[str, int]] = {}
        for a in classes:
            row = dict(self.flips.get(a, {}))
            same = self.champion.get(a, 0) - sum(row.values())
            if same > 0:
                row[a] = same
            if row:
                matrix[a] = dict(sorted(row.items()))
        edges = list(LATENCY_MS_EDGES)
        lat: dict[str, float | None] = {}
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            champ = quantile(edges, np.asarray(self.champion_latency), q)
            chall = quantile(edges, np.asarray(self.challenger_latency), q)
            lat[f"champion_{name}_ms"] = champ
            lat[f"challenger_{name}_ms"] = chall
            lat[f"ratio_{name}"] = chall / champ if champ and chall is not None else None
        drift = None
        if classes and sum(self.champion.values()) and sum(self.challenger.values()):
            drift = float(
                psi(
                    [self.champion.get(c, 0) for c in classes],
                    [self.challenger.get(c, 0) for c in classes],
                )
            )
        overheads = list(self.overhead.values())
        return {
            "compared": self.compared,
            "agreed": self.agreed,
            "agreement": self.agreed / self.compared if self.compared else None,
            "flip_matrix": matrix,
            "latency": lat,
            "prediction_psi": drift,
            "champion_predictions": dict(sorted(self.champion.items())),
            "challenger_predictions": dict(sorted(self.challenger.items())),
            "sampled_out": self.sampled_out,
            "skipped_budget": self.skipped_budget,
            "overhead_max": max(overheads) if overheads else None,
            "devices": len(self.devices),
        }


def _add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    for k, n in counts.items():
        into[k] = into.get(k, 0) + int(n)


def _add_latency(into: list[int], h: Histogram | None) -> None:
    """Latency histograms are on the fixed ``LATENCY_MS_EDGES`` (others are left out)."""
    if h is not None and list(h.edges) == list(LATENCY_MS_EDGES):
        for i, n in enumerate(h.counts[: len(into)]):
            into[i] += n


def check_challenger(batch: TelemetryBatch, ref: Reference, *, max_count: int) -> None:
    """A challenger's batch is checked like any (against the challenger's reference); one
    of skipped or sampled-out inputs only (count 0) has no histograms to check."""
    if batch.count:
        check(batch, ref, max_count=max_count)
    elif (why := batch.inconsistency()) is not None:
        raise BadTelemetry("inconsistent", why)


def add(tx: Tx, batch: TelemetryBatch) -> None:
    """Count a challenger's batch in the transaction (written once, before commit)."""
    c = batch.shadow
    assert c is not None
    found: dict[Key, Comparison] = tx.shared.setdefault("shadow", {})
    key = (
        batch.model,
        batch.version,
        str(c.rollout_id) if c.rollout_id else "",
        batch.group or "",
        c.champion_version,
    )
    found.setdefault(key, Comparison()).add(batch)
    tx.before_commit("shadow", lambda: _flush(tx))


async def _flush(tx: Tx) -> None:
    """Merge the transaction's comparisons with the stored ones, each under its row lock."""
    found: dict[Key, Comparison] = tx.shared.get("shadow", {})
    for key, part in sorted(found.items()):
        # the row exists before it is locked (two replicas would otherwise both insert)
        await tx.conn.execute(
            """INSERT INTO shadow_comparisons (model, version, rollout_id, grp, champion_version)
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
            *key,
        )
        row = await tx.conn.fetchrow(
            """SELECT * FROM shadow_comparisons WHERE model = $1 AND version = $2
               AND rollout_id = $3 AND grp = $4 AND champion_version = $5 FOR UPDATE""",
            *key,
        )
        total = Comparison.from_row(row)
        total.merge(part)
        await tx.conn.execute(
            """UPDATE shadow_comparisons SET compared = $6, agreed = $7, sampled_out = $8,
                   skipped_budget = $9, aggregate = $10::jsonb, updated_at = now()
               WHERE model = $1 AND version = $2 AND rollout_id = $3 AND grp = $4
               AND champion_version = $5""",
            *key,
            total.compared,
            total.agreed,
            total.sampled_out,
            total.skipped_budget,
            json.dumps(total.aggregate_json()),
        )


async def report(
    conn: Conn, model: str, version: str, rollout_id: str | None = None
) -> dict[str, Any]:
    """The challenger ``model@version``'s comparisons (of one shadow rollout, or all):
    per group and over all, with the champion versions they were compared with."""
    rows = await conn.fetch(
        """SELECT * FROM shadow_comparisons WHERE model = $1 AND version = $2
           AND ($3::text IS NULL OR rollout_id = $3) ORDER BY grp, champion_version""",
        model,
        version,
        rollout_id,
    )
    return summarise(model, version, rollout_id, rows)


def summarise(
    model: str, version: str, rollout_id: str | None, rows: Iterable[Any]
) -> dict[str, Any]:
    """The report of ``shadow_comparisons`` rows (see the module's docstring)."""
    groups: dict[str, Comparison] = {}
    overall = Comparison()
    champions: set[str] = set()
    rollouts: set[str] = set()
    first = last = None
    for row in rows:
        part = Comparison.from_row(row)
        groups.setdefault(row["grp"], Comparison()).merge(part)
        overall.merge(part)
        champions.add(row["champion_version"])
        if row["rollout_id"]:
            rollouts.add(row["rollout_id"])
        first = min(first or row["first_at"], row["first_at"])
        last = max(last or row["updated_at"], row["updated_at"])
    return {
        "model": model,
        "version": version,
        "rollout_id": rollout_id,
        "rollouts": sorted(rollouts),
        "champion_versions": sorted(champions),
        "first_at": first.isoformat() if first else None,
        "updated_at": last.isoformat() if last else None,
        "overall": overall.report(),
        "groups": {g: c.report() for g, c in sorted(groups.items())},
    }
