"""Quality metrics of a model's predictions on its suite."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn import metrics as skm

from edgeloop.contracts.thresholds import HEADLINE, HIGHER_IS_BETTER
from edgeloop.edge.runtime import Prediction

__all__ = ["HEADLINE", "HIGHER_IS_BETTER", "classification", "regression"]


def classification(pred: Prediction, y: npt.NDArray[Any]) -> dict[str, float]:
    """Accuracy, macro F1, ROC AUC (binary or one-vs-rest) and per-class recall/precision."""
    assert pred.labels is not None
    labels = pred.labels.astype(y.dtype) if y.dtype.kind in "iuf" else pred.labels.astype(str)
    truth = y if y.dtype.kind in "iuf" else y.astype(str)
    out = {
        "accuracy": float(skm.accuracy_score(truth, labels)),
        "f1_macro": float(skm.f1_score(truth, labels, average="macro", zero_division=0)),
    }
    if pred.probabilities is not None:
        probs = pred.probabilities
        classes = np.unique(truth)
        try:
            if probs.shape[1] == 2 and len(classes) <= 2:
                out["roc_auc"] = float(skm.roc_auc_score(truth, probs[:, 1]))
            elif len(classes) == probs.shape[1]:
                out["roc_auc"] = float(
                    skm.roc_auc_score(truth, probs, multi_class="ovr", average="macro")
                )
        except ValueError:
            pass  # one class only in the suite: AUC is undefined
    precision, recall, _, _ = skm.precision_recall_fscore_support(truth, labels, zero_division=0)
    for cls, p, r in zip(
        np.unique(np.concatenate([truth, labels])), precision, recall, strict=False
    ):
        out[f"precision[{cls}]"] = float(p)
        out[f"recall[{cls}]"] = float(r)
    return out


def regression(pred: Prediction, y: npt.NDArray[Any]) -> dict[str, float]:
    """MAE and RMSE."""
    assert pred.values is not None
    values = np.asarray(pred.values, dtype=np.float64).reshape(len(y), -1)[:, 0]
    return {
        "mae": float(skm.mean_absolute_error(y, values)),
        "rmse": float(np.sqrt(skm.mean_squared_error(y, values))),
    }


def better_or_equal(metric: str, candidate: float, champion: float, tolerance: float) -> bool:
    """Whether ``candidate`` does not regress against ``champion`` beyond ``tolerance``."""
    if metric in HIGHER_IS_BETTER:
        return candidate >= champion - tolerance
    return candidate <= champion * (1 + tolerance) + 1e-12
