"""Reference data profile: what "normal" looks like, computed once at registration.

The monitor compares live telemetry against it (PSI, KS, Jensen-Shannon, chi²), so the
bins are the ones the agents histogram into: per numeric feature, quantile edges of the
reference sample (deciles by default; duplicate edges collapsed), with the counts of the
reference rows per bin, under/overflow included as the first/last bin; per categorical
feature (few distinct integer values), the count per category. The prediction
distribution is the model's output on the same rows: class counts for a classifier,
binned values for a regressor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edgeloop.edge.runtime import OnnxModel

PROFILE_SCHEMA_VERSION = 1
MAX_CATEGORIES = 20


def _edges(values: npt.NDArray[np.float64], bins: int) -> list[float]:
    qs = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return [float(e) for e in np.unique(qs)]


def _counts(values: npt.NDArray[np.float64], edges: list[float]) -> list[int]:
    # bin i holds edges[i-1] < v <= edges[i]; bin 0 is v <= edges[0], the last v > edges[-1]
    idx = np.searchsorted(np.asarray(edges), values, side="left")
    return [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)]


def _is_categorical(col: npt.NDArray[np.float64]) -> bool:
    uniq = np.unique(col)
    return len(uniq) <= MAX_CATEGORIES and bool(np.all(np.mod(uniq, 1) == 0))


def feature_profile(name: str, col: npt.NDArray[np.float64], bins: int) -> dict[str, Any]:
    """Profile of one feature column."""
    base = {
        "name": name,
        "count": int(col.size),
        "mean": float(col.mean()),
        "std": float(col.std()),
        "min": float(col.min()),
        "max": float(col.max()),
    }
    if _is_categorical(col):
        cats, counts = np.unique(col, return_counts=True)
        return {
            **base,
            "kind": "categorical",
            "categories": [int(c) for c in cats],
            "counts": [int(c) for c in counts],
        }
    edges = _edges(col, bins)
    return {**base, "kind": "numeric", "edges": edges, "counts": _counts(col, edges)}


def compute_profile(
    model: OnnxModel,
    x: npt.NDArray[Any],
    feature_names: list[str] | None = None,
    *,
    bins: int = 10,
) -> dict[str, Any]:
    """The reference profile of ``x`` (rows x features) under ``model``."""
    data = np.asarray(model.check_features(x, "reference X"), dtype=np.float64)
    if len(data) < 2:
        raise ValueError("reference X needs at least 2 rows to profile")
    if not np.all(np.isfinite(data)):
        raise ValueError("reference X contains NaN or infinite values")
    names = feature_names or [f"f{i}" for i in range(data.shape[1])]
    if len(names) != data.shape[1]:
        raise ValueError(
            f"reference has {len(names)} feature names for {data.shape[1]} feature columns"
        )
    pred = model.predict(data)
    prediction: dict[str, Any]
    if pred.labels is not None:
        labels, counts = np.unique(pred.labels.astype(str), return_counts=True)
        prediction = {
            "kind": "categorical",
            "categories": labels.tolist(),
            "counts": [int(c) for c in counts],
        }
        if pred.confidence is not None:
            prediction["confidence"] = feature_profile(
                "confidence", pred.confidence.astype(np.float64), bins
            )
    else:
        assert pred.values is not None
        values = np.asarray(pred.values, dtype=np.float64).reshape(len(data), -1)[:, 0]
        prediction = feature_profile("prediction", values, bins)
    return {
        "schema_version": PROFILE_SCHEMA_VERSION,
        "rows": len(data),
        "features": [feature_profile(n, data[:, i], bins) for i, n in enumerate(names)],
        "prediction": prediction,
    }
