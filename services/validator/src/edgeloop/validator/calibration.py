"""The calibration map of a classifier, learnt from its validation suite (CBPE).

For every suite row: the predicted class, its confidence (the top-class probability, what
agents histogram) and whether the prediction was right. Per confidence bin — the agents'
``CONFIDENCE_EDGES``, so the monitor can apply the map to the histograms devices already
send — the share of right predictions, pooled and per predicted class:

- **smoothed**, because suites are small: each bin starts with one pseudo-row (pooled:
  at the model's own mean confidence in that bin; per class: at the pooled value), so an
  empty or thin bin falls back on what is known instead of on 0 or 1;
- **monotone** (pool adjacent violators, weighted by rows): a more confident prediction
  is never taken as less likely right, as in isotonic calibration.

Estimating under covariate shift then assumes what CBPE assumes: P(right | confidence)
does not change (no concept drift), only how many predictions fall in each bin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeloop.contracts.calibration import BinCalibration, CalibrationMap
from edgeloop.contracts.events import CONFIDENCE_EDGES
from edgeloop.edge.runtime import Prediction

#: pseudo-rows per bin (the prior's weight against the suite's rows)
PRIOR_ROWS = 1.0

FloatArray = npt.NDArray[np.float64]


def _pav(values: FloatArray, weights: FloatArray) -> FloatArray:
    """Weighted non-decreasing least-squares fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for v, w in zip(values.tolist(), weights.tolist(), strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            b = blocks.pop()
            a = blocks.pop()
            weight = a[1] + b[1]
            blocks.append([(a[0] * a[1] + b[0] * b[1]) / weight, weight, a[2] + b[2]])
    return np.asarray([m for m, _, n in blocks for _ in range(int(n))], dtype=np.float64)


def _curve(
    bins: npt.NDArray[np.intp], right: npt.NDArray[np.bool_], prior: FloatArray
) -> BinCalibration:
    width = len(CONFIDENCE_EDGES) + 1
    count = np.bincount(bins, minlength=width)
    correct = np.bincount(bins, weights=right.astype(np.float64), minlength=width)
    smoothed = (correct + PRIOR_ROWS * prior) / (count + PRIOR_ROWS)
    fitted = np.clip(_pav(smoothed, (count + PRIOR_ROWS).astype(np.float64)), 0.0, 1.0)
    return BinCalibration(
        count=count.astype(int).tolist(),
        correct=correct.round().astype(int).tolist(),
        accuracy=[round(float(a), 6) for a in fitted],
    )


def fit(
    predicted: Sequence[Any] | npt.NDArray[Any],
    confidence: npt.NDArray[Any],
    right: npt.NDArray[np.bool_],
    classes: Sequence[Any],
) -> CalibrationMap:
    """The map of one model on its suite.

    Args:
        predicted: the predicted class per row (compared as text, as telemetry names it).
        confidence: the predicted class's probability per row.
        right: whether each prediction equals the suite's label.
        classes: the model's classes, in its own order (binary: the second is positive).
    """
    labels = np.asarray([str(v) for v in predicted])
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    edges = np.asarray(CONFIDENCE_EDGES)
    bins = np.searchsorted(edges, conf, side="left")  # the agents' binning rule
    width = len(edges) + 1
    # prior of the pooled curve: the model's own mean confidence in the bin (its middle
    # when the suite has none there)
    lower = np.concatenate([[0.0], edges])
    upper = np.concatenate([edges, [1.0]])
    n = np.bincount(bins, minlength=width)
    total = np.bincount(bins, weights=conf, minlength=width)
    prior = np.where(n > 0, total / np.maximum(n, 1), (lower + upper) / 2)
    pooled = _curve(bins, right, prior)
    pooled_acc = np.asarray(pooled.accuracy)
    names = [str(c) for c in classes] or sorted(set(labels.tolist()))
    by_class = {c: _curve(bins[labels == c], right[labels == c], pooled_acc) for c in names}
    return CalibrationMap(
        classes=names,
        positive=names[1] if len(names) == 2 else None,
        suite_rows=len(labels),
        pooled=pooled,
        by_class=by_class,
    )


def from_prediction(pred: Prediction, y: npt.NDArray[Any]) -> CalibrationMap | None:
    """The map of a classifier's predictions on the suite (None without probabilities)."""
    if pred.labels is None or pred.confidence is None:
        return None
    labels = pred.labels.astype(y.dtype) if y.dtype.kind in "iuf" else pred.labels.astype(str)
    truth = y if y.dtype.kind in "iuf" else y.astype(str)
    return fit(pred.labels, pred.confidence, np.asarray(labels == truth), pred.classes)
