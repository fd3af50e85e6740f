"""Per-window aggregation of inferences into one ``TelemetryBatch`` (DESIGN §6).

Feature histograms use the reference profile's bin edges with the registry's binning
rule (``searchsorted(edges, v, side="left")``: bin 0 is ``v <= edges[0]``, the last bin
``v > edges[-1]``), so the monitor compares like with like and histograms of one model
version merge by adding counts. Everything is vectorised: ``add`` costs a few numpy
calls whatever the batch size.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.timestamp_pb2 import Timestamp

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import CONFIDENCE_EDGES, LATENCY_MS_EDGES


def edges_from_profile(
    profile: Mapping[str, Any] | None, n_features: int
) -> list[list[float]] | None:
    """Per-feature bin edges of a reference profile (None without a usable profile).

    Numeric features use the profile's quantile edges; a categorical feature gets edges
    half-way between its sorted categories, so each category has a bin.
    """
    if not profile:
        return None
    features = profile.get("features") or []
    if len(features) != n_features:
        return None
    out: list[list[float]] = []
    for f in features:
        if f.get("kind") == "categorical":
            cats = sorted(float(c) for c in f.get("categories", []))
            out.append([(a + b) / 2 for a, b in itertools.pairwise(cats)])
        else:
            out.append([float(e) for e in f.get("edges", [])])
    return out


def _hist(values: npt.NDArray[Any], edges: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    idx = np.searchsorted(edges, values, side="left")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.int64)


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


class TelemetryAggregator:
    """Counts, histograms and a sample of one telemetry window."""

    def __init__(
        self,
        *,
        feature_names: Sequence[str],
        feature_edges: Sequence[Sequence[float]] | None = None,
        low_confidence: float = 0.6,
        max_samples: int = 32,
        random_share: float = 0.01,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.feature_names = list(feature_names)
        self.edges: list[npt.NDArray[np.float64]] | None = (
            [np.asarray(e, dtype=np.float64) for e in feature_edges]
            if feature_edges is not None
            else None
        )
        self.low_confidence = low_confidence
        self.max_samples = max_samples
        self.random_share = random_share
        self.rng = np.random.default_rng(seed)
        self.clock = clock
        self._conf_edges = np.asarray(CONFIDENCE_EDGES)
        self._lat_edges = np.asarray(LATENCY_MS_EDGES)
        self._reset()

    def _reset(self) -> None:
        n = len(self.feature_names)
        self._count = 0
        self._errors = 0
        self._low = 0
        self._start: float | None = None
        self._features = (
            [np.zeros(len(e) + 1, dtype=np.int64) for e in self.edges] if self.edges else None
        )
        self._conf = np.zeros(len(self._conf_edges) + 1, dtype=np.int64)
        self._conf_seen = False
        self._conf_by_prediction: dict[str, npt.NDArray[np.int64]] = {}
        self._lat = np.zeros(len(self._lat_edges) + 1, dtype=np.int64)
        self._predictions: dict[str, int] = {}
        self._samples: list[pb.Sample] = []
        self._low_seen = 0
        del n

    @property
    def count(self) -> int:
        """Inferences in the current window."""
        return self._count

    def add_errors(self, n: int) -> None:
        """Inferences that failed (counted, nothing else known of them)."""
        if self._start is None:
            self._start = self.clock()
        self._count += n
        self._errors += n

    def add(
        self,
        X: npt.NDArray[Any],
        labels: Sequence[Any] | npt.NDArray[Any],
        confidence: npt.NDArray[Any] | None,
        latency_ms: float | npt.NDArray[Any],
    ) -> None:
        """Add one inference batch (rows of ``X`` with their predictions)."""
        x = np.asarray(X, dtype=np.float64)
        rows = len(x)
        if rows == 0:
            return
        if self._start is None:
            self._start = self.clock()
        finite = np.isfinite(x).all(axis=1)
        bad = int(rows - finite.sum())
        self._count += rows
        self._errors += bad
        good = x[finite]
        if self.edges is None:
            self.edges = [
                np.unique(np.quantile(good[:, j], np.linspace(0, 1, 11)[1:-1]))
                if len(good)
                else np.zeros(0)
                for j in range(x.shape[1])
            ]
            self._features = [np.zeros(len(e) + 1, dtype=np.int64) for e in self.edges]
        assert self._features is not None
        for j, edges in enumerate(self.edges):
            if j < good.shape[1]:
                self._features[j] += _hist(good[:, j], edges)
        label_arr = np.asarray([str(v) for v in labels]) if len(labels) else np.asarray([])
        uniq, counts = np.unique(label_arr, return_counts=True)
        for u, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            self._predictions[u] = self._predictions.get(u, 0) + c
        lat = np.broadcast_to(np.asarray(latency_ms, dtype=np.float64), (rows,))
        self._lat += _hist(lat, self._lat_edges)
        if confidence is None:
            return
        conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
        self._conf_seen = True
        bins = np.searchsorted(self._conf_edges, conf, side="left")
        self._conf += np.bincount(bins, minlength=len(self._conf_edges) + 1)
        if len(label_arr) == len(conf):
            # per predicted class, for label-free accuracy estimation: one bincount over
            # (class, bin) pairs
            width = len(self._conf_edges) + 1
            per = np.bincount(
                np.searchsorted(uniq, label_arr) * width + bins, minlength=len(uniq) * width
            )
            for k, u in enumerate(uniq.tolist()):
                row = per[k * width : (k + 1) * width]
                if u in self._conf_by_prediction:
                    self._conf_by_prediction[u] += row
                else:
                    self._conf_by_prediction[u] = row.astype(np.int64)
        is_low = conf < self.low_confidence
        self._low += int(is_low.sum())
        # kept: low-confidence rows, and a small random share of all rows (so retraining
        # data follows drift where the model is confidently wrong)
        keep = np.flatnonzero((is_low | (self.rng.random(len(conf)) < self.random_share)) & finite)
        now = self.clock()
        for i in keep.tolist():  # reservoir sampling over the window's kept rows
            self._low_seen += 1
            if len(self._samples) < self.max_samples:
                slot = len(self._samples)
                self._samples.append(pb.Sample())
            else:
                slot = int(self.rng.integers(0, self._low_seen))
                if slot >= self.max_samples:
                    continue
            self._samples[slot] = pb.Sample(
                features=x[i].tolist(),
                prediction=str(label_arr[i]) if i < len(label_arr) else "",
                confidence=float(conf[i]),
                at=_ts(now),
                kind="low-confidence" if is_low[i] else "random",
            )

    def flush(
        self,
        *,
        device_id: str,
        model: str,
        version: str,
        digest: str,
        dropped_batches: int = 0,
        corrupt_batches: int = 0,
        trace_parent: str = "",
    ) -> pb.TelemetryBatch | None:
        """The window as one batch (None when empty); a new window starts."""
        if self._count == 0:
            return None
        end = self.clock()
        batch = pb.TelemetryBatch(
            batch_id=str(uuid.uuid4()),
            device_id=device_id,
            model=model,
            version=version,
            digest=digest,
            window_start=_ts(self._start if self._start is not None else end),
            window_end=_ts(end),
            count=self._count,
            errors=self._errors,
            low_confidence=self._low,
            feature_names=self.feature_names,
            prediction_counts=self._predictions,
            latency_ms_histogram=pb.Histogram(
                edges=self._lat_edges.tolist(), counts=self._lat.tolist()
            ),
            samples=self._samples,
            dropped_batches=dropped_batches,
            corrupt_batches=corrupt_batches,
            trace_parent=trace_parent,
        )
        if self.edges is not None and self._features is not None:
            for edges, counts in zip(self.edges, self._features, strict=True):
                batch.feature_histograms.add(edges=edges.tolist(), counts=counts.tolist())
        if self._conf_seen:
            batch.confidence_histogram.CopyFrom(
                pb.Histogram(edges=self._conf_edges.tolist(), counts=self._conf.tolist())
            )
            for label, counts in self._conf_by_prediction.items():
                batch.confidence_by_prediction[label].CopyFrom(
                    pb.Histogram(edges=self._conf_edges.tolist(), counts=counts.tolist())
                )
        self._reset()
        return batch
