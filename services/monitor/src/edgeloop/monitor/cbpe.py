"""Accuracy without labels: confidence-based performance estimation (CBPE) of a window.

The validator learnt, on the suite, how often a prediction is right per confidence bin
and predicted class (``edgeloop.contracts.calibration``). Devices histogram every
prediction's confidence on the same bins, per predicted class. A window's expected
number of right predictions is then the sum over classes and bins of count * fitted
accuracy, its estimated accuracy that sum over the predictions counted. For a binary
classifier the same gives the expected confusion matrix, hence F1 of the positive class:

    TP = sum_b n[pos, b] * a[pos, b]
    FP = n[pos] - TP
    FN = n[neg] - sum_b n[neg, b] * a[neg, b]

Windows from agents that send only the overall confidence histogram (older agents) are
estimated with the pooled curve, the part of a window such agents contributed too (their
counts are what the overall histogram holds beyond the per-class ones); F1 needs every
prediction's class, so it is left out for such windows.

The estimate holds under covariate shift — the inputs move, P(right | confidence) does
not — which is what CBPE assumes; under concept drift (the same inputs now mean another
class) no label-free estimate can hold.
"""

from __future__ import annotations

import numpy as np

from edgeloop.contracts.calibration import CalibrationMap
from edgeloop.monitor.aggregate import Window

ACCURACY = "estimated_accuracy"
F1 = "estimated_f1"


def estimate(window: Window, cal: CalibrationMap | None) -> dict[str, float]:
    """``estimated_accuracy`` (and ``estimated_f1`` for a binary classifier) of a window;
    empty without a calibration map or confidences on the map's bins."""
    if cal is None or window.confidence is None or window.confidence_edges != cal.edges:
        return {}
    pooled = np.asarray(cal.pooled.accuracy)
    right: dict[str, float] = {}
    counted: dict[str, int] = {}
    for label, counts in window.confidence_by_prediction.items():
        curve = cal.by_class.get(label, cal.pooled)
        right[label] = float(counts @ np.asarray(curve.accuracy))
        counted[label] = int(counts.sum())
    per_class = sum(window.confidence_by_prediction.values(), np.zeros_like(window.confidence))
    rest = np.clip(window.confidence - per_class, 0, None)  # from agents without per-class
    total = sum(counted.values()) + int(rest.sum())
    if total == 0:
        return {}
    out = {ACCURACY: (sum(right.values()) + float(rest @ pooled)) / total}
    if cal.positive is not None and not rest.any() and len(cal.classes) == 2:
        pos = cal.positive
        neg = next(c for c in cal.classes if c != pos)
        tp = right.get(pos, 0.0)
        fp = counted.get(pos, 0) - tp
        fn = counted.get(neg, 0) - right.get(neg, 0.0)
        if 2 * tp + fp + fn > 0:
            out[F1] = 2 * tp / (2 * tp + fp + fn)
    return out
