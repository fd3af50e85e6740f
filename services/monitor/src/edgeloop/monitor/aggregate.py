"""Mergeable window aggregates of batched telemetry, checked against the version's
reference profile.

Agents histogram every feature on the reference profile's bins (numeric: its quantile
edges; categorical: one bin per category), so a window is a matrix of counts — one row
per feature, padded with zeros to the widest — that merges by addition and compares with
the reference directly (``edgeloop.monitor.drift``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeloop.contracts.calibration import CalibrationMap
from edgeloop.contracts.events import (
    CONFIDENCE_EDGES,
    LATENCY_MS_EDGES,
    Histogram,
    TelemetryBatch,
)

IntArray = npt.NDArray[np.int64]


class BadTelemetry(ValueError):
    """A batch that must not enter the aggregates; ``code`` names the kind of fault."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Reference:
    """A version's reference profile, as count vectors on the agents' bins."""

    model: str
    version: str
    names: list[str]
    kinds: list[str]
    edges: list[list[float]]
    counts: IntArray
    """features x bins, zero-padded."""
    prediction_categories: list[str]
    prediction_counts: IntArray
    calibration: CalibrationMap | None = None
    """the validator's calibration map (classifiers validated with one): label-free
    accuracy estimates (``edgeloop.monitor.cbpe``)."""

    @classmethod
    def from_profile(cls, model: str, version: str, profile: dict[str, Any]) -> Reference:
        """Parse the registry's ``profile.json``."""
        features = profile.get("features") or []
        if not features:
            raise ValueError(f"{model}@{version} has a reference profile without features")
        names, kinds, edges, rows = [], [], [], []
        for f in features:
            names.append(str(f["name"]))
            kinds.append(str(f.get("kind", "numeric")))
            if f.get("kind") == "categorical":
                cats = sorted(float(c) for c in f["categories"])
                edges.append([(a + b) / 2 for a, b in itertools.pairwise(cats)])
                order = np.argsort([float(c) for c in f["categories"]])
                rows.append(np.asarray(f["counts"], dtype=np.int64)[order])
            else:
                edges.append([float(e) for e in f["edges"]])
                rows.append(np.asarray(f["counts"], dtype=np.int64))
        width = max(len(r) for r in rows)
        counts = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            counts[i, : len(r)] = r
        pred = profile.get("prediction") or {}
        labels: list[str] = (
            [str(c) for c in pred.get("categories", [])]
            if pred.get("kind") == "categorical"
            else []
        )
        pcounts = np.asarray(pred.get("counts", []) if labels else [], dtype=np.int64)
        return cls(model, version, names, kinds, edges, counts, labels, pcounts)

    @property
    def width(self) -> int:
        return int(self.counts.shape[1])


def _check_hist(h: Histogram, what: str) -> None:
    if len(h.counts) != len(h.edges) + 1:
        raise BadTelemetry(
            "bad_histogram",
            f"{what}: {len(h.edges)} edges need {len(h.edges) + 1} counts, got {len(h.counts)}",
        )
    if not all(math.isfinite(e) for e in h.edges):
        raise BadTelemetry("not_finite", f"{what}: an edge is NaN or infinite")


def check(batch: TelemetryBatch, ref: Reference, *, max_count: int) -> None:
    """Refuse a batch that would poison the aggregates (``BadTelemetry`` says why).

    What needs the reference profile is checked here; the batch's own consistency
    (``TelemetryBatch.inconsistency``) is checked at the gateway and again here, for
    what reaches the bus by another way.
    """
    if batch.count > max_count:
        raise BadTelemetry(
            "too_large", f"{batch.count} inferences in one batch (at most {max_count})"
        )
    if (why := batch.inconsistency()) is not None:
        raise BadTelemetry("inconsistent", why)
    if len(batch.feature_histograms) != len(ref.names):
        raise BadTelemetry(
            "feature_count",
            f"{len(batch.feature_histograms)} feature histograms; {ref.model}@{ref.version} "
            f"has {len(ref.names)} features",
        )
    for i, h in enumerate(batch.feature_histograms):
        name = ref.names[i]
        if h.edges != ref.edges[i]:  # agents bin on the profile's edges: equal, normally
            _check_hist(h, f"feature {name}")
            if len(h.edges) != len(ref.edges[i]) or not np.allclose(
                h.edges, ref.edges[i], rtol=1e-6, atol=1e-9
            ):
                raise BadTelemetry(
                    "bins",
                    f"feature {name} is binned on other edges than the reference profile's",
                )
        elif len(h.counts) != len(h.edges) + 1:
            _check_hist(h, f"feature {name}")
    for what, extra, edges in (
        ("confidence", batch.confidence_histogram, CONFIDENCE_EDGES),
        ("latency", batch.latency_ms_histogram, LATENCY_MS_EDGES),
        *(
            (f"prediction {label!r} confidence", h, CONFIDENCE_EDGES)
            for label, h in sorted(batch.confidence_by_prediction.items())
        ),
    ):
        if extra is not None:
            _check_hist(extra, what)
            # the first batch of a window sets its bins: other bins would drop everyone's
            if tuple(extra.edges) != edges:
                raise BadTelemetry("bins", f"the {what} histogram is not on the agents' bins")


@dataclass
class Window:
    """One (model, version, group, window) aggregate, and each device's part of it
    (``by_device``: what trimming a device from the window takes away)."""

    count: int = 0
    errors: int = 0
    low_confidence: int = 0
    batches: int = 0
    features: IntArray | None = None
    predictions: dict[str, int] = field(default_factory=dict)
    confidence_edges: list[float] | None = None
    confidence: IntArray | None = None
    latency_edges: list[float] | None = None
    latency: IntArray | None = None
    confidence_by_prediction: dict[str, IntArray] = field(default_factory=dict)
    """predicted class → confidence counts on ``CONFIDENCE_EDGES`` (checked at entry)."""
    devices: set[str] = field(default_factory=set)
    by_device: dict[str, Window] = field(default_factory=dict)

    def add(self, batch: TelemetryBatch, ref: Reference) -> None:
        """Merge one checked batch."""
        self._add(batch, ref)
        self.by_device.setdefault(batch.device_id, Window())._add(batch, ref)

    def _add(self, batch: TelemetryBatch, ref: Reference) -> None:
        rows = np.zeros((len(ref.names), ref.width), dtype=np.int64)
        for i, h in enumerate(batch.feature_histograms):
            rows[i, : len(h.counts)] = h.counts
        self.features = rows if self.features is None else self.features + rows
        self.count += batch.count
        self.errors += batch.errors
        self.low_confidence += batch.low_confidence
        self.batches += 1
        for label, n in batch.prediction_counts.items():
            self.predictions[label] = self.predictions.get(label, 0) + n
        self.confidence_edges, self.confidence = _merge_hist(
            self.confidence_edges, self.confidence, batch.confidence_histogram
        )
        self.latency_edges, self.latency = _merge_hist(
            self.latency_edges, self.latency, batch.latency_ms_histogram
        )
        _add_counts(
            self.confidence_by_prediction,
            {
                k: np.asarray(h.counts, dtype=np.int64)
                for k, h in batch.confidence_by_prediction.items()
            },
        )
        self.devices.add(batch.device_id)

    def merge(self, other: Window) -> None:
        """Add another aggregate of the same window."""
        self._merge(other)
        for device, part in other.by_device.items():
            self.by_device.setdefault(device, Window())._merge(part)

    def without(self, devices: set[str]) -> Window:
        """The aggregate without ``devices``' parts (no per-device parts kept)."""
        out = Window()
        out._merge(self)
        for device in devices & set(self.by_device):
            out._subtract(self.by_device[device])
        return out

    def _subtract(self, part: Window) -> None:
        if part.features is not None and self.features is not None:
            self.features = self.features - part.features
        self.count -= part.count
        self.errors -= part.errors
        self.low_confidence -= part.low_confidence
        self.batches -= part.batches
        for label, n in part.predictions.items():
            left = self.predictions.get(label, 0) - n
            if left > 0:
                self.predictions[label] = left
            else:
                self.predictions.pop(label, None)
        for name in ("confidence", "latency"):
            counts = getattr(part, name)
            mine = getattr(self, name)
            same = getattr(part, f"{name}_edges") == getattr(self, f"{name}_edges")
            if counts is not None and mine is not None and same:
                setattr(self, name, mine - counts)
        _add_counts(
            self.confidence_by_prediction,
            {k: -v for k, v in part.confidence_by_prediction.items()},
        )
        self.devices -= part.devices

    def _merge(self, other: Window) -> None:
        if other.features is not None:
            self.features = (
                other.features if self.features is None else self.features + other.features
            )
        self.count += other.count
        self.errors += other.errors
        self.low_confidence += other.low_confidence
        self.batches += other.batches
        for label, n in other.predictions.items():
            self.predictions[label] = self.predictions.get(label, 0) + n
        for name in ("confidence", "latency"):
            edges, counts = getattr(other, f"{name}_edges"), getattr(other, name)
            if counts is not None:
                e, c = _merge_hist(
                    getattr(self, f"{name}_edges"),
                    getattr(self, name),
                    Histogram(edges=edges, counts=counts.tolist()),
                )
                setattr(self, f"{name}_edges", e)
                setattr(self, name, c)
        _add_counts(self.confidence_by_prediction, other.confidence_by_prediction)
        self.devices |= other.devices

    def to_json(self) -> dict[str, Any]:
        """For the window table (jsonb)."""
        return {
            "count": self.count,
            "errors": self.errors,
            "low_confidence": self.low_confidence,
            "batches": self.batches,
            "features": self.features.tolist() if self.features is not None else None,
            "predictions": self.predictions,
            "confidence_edges": self.confidence_edges,
            "confidence": self.confidence.tolist() if self.confidence is not None else None,
            "latency_edges": self.latency_edges,
            "latency": self.latency.tolist() if self.latency is not None else None,
            "confidence_by_prediction": {
                k: v.tolist() for k, v in sorted(self.confidence_by_prediction.items())
            },
            "devices": sorted(self.devices),
            "by_device": {d: w.to_json() for d, w in sorted(self.by_device.items())},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Window:
        def arr(v: Any) -> IntArray | None:
            return None if v is None else np.asarray(v, dtype=np.int64)

        return cls(
            count=d["count"],
            errors=d["errors"],
            low_confidence=d["low_confidence"],
            batches=d["batches"],
            features=arr(d["features"]),
            predictions=dict(d["predictions"]),
            confidence_edges=d["confidence_edges"],
            confidence=arr(d["confidence"]),
            latency_edges=d["latency_edges"],
            latency=arr(d["latency"]),
            confidence_by_prediction={
                k: np.asarray(v, dtype=np.int64)
                for k, v in (d.get("confidence_by_prediction") or {}).items()
            },
            devices=set(d["devices"]),
            by_device={k: cls.from_json(v) for k, v in (d.get("by_device") or {}).items()},
        )


def _add_counts(into: dict[str, IntArray], other: dict[str, IntArray]) -> None:
    """Add per-label counts (negative ones subtract); a label left with none is dropped."""
    for label, counts in other.items():
        mine = into.get(label)
        total = counts.copy() if mine is None else mine + counts
        if total.any():
            into[label] = total
        else:
            into.pop(label, None)


def _merge_hist(
    edges: list[float] | None, counts: IntArray | None, h: Histogram | None
) -> tuple[list[float] | None, IntArray | None]:
    if h is None:
        return edges, counts
    new = np.asarray(h.counts, dtype=np.int64)
    if counts is None or edges is None:
        return list(h.edges), new
    if list(h.edges) != list(edges):  # other bins: keep the first (latency edges are fixed)
        return edges, counts
    return edges, counts + new


def quantile(edges: list[float] | None, counts: IntArray | None, q: float) -> float | None:
    """The ``q`` quantile of a histogram: the upper edge of the bin it falls in (the last
    bin, unbounded above, reports its lower edge)."""
    if edges is None or counts is None or counts.sum() == 0:
        return None
    cum = np.cumsum(counts) / counts.sum()
    i = int(np.searchsorted(cum, q, side="left"))
    return float(edges[min(i, len(edges) - 1)])
