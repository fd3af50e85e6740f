"""Real models for the examples and tests: scikit-learn's bundled datasets (no downloads),
converted with skl2onnx, with their validation suites and reference samples as .npz."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelFiles:
    """An ONNX model with its suite (X, y) and reference (X, feature_names) as npz bytes."""

    onnx: bytes
    suite: bytes
    reference: bytes
    n_features: int


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@cache
def classifier(dataset: str = "breast_cancer", *, c: float = 1.0, seed: int = 0) -> ModelFiles:
    """A logistic regression on a bundled dataset, split train/validation."""
    from skl2onnx import to_onnx
    from sklearn import datasets
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = getattr(datasets, f"load_{dataset}")()
    x = data.data.astype(np.float32)
    x_train, x_val, y_train, y_val = train_test_split(
        x, data.target, test_size=0.3, random_state=seed, stratify=data.target
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    model.fit(x_train, y_train)
    onx = to_onnx(
        model, x_train[:1], options={id(model.steps[-1][1]): {"zipmap": False}}, target_opset=17
    )
    return ModelFiles(
        onnx=onx.SerializeToString(),
        suite=_npz(X=x_val, y=y_val),
        reference=_npz(X=x_train, feature_names=np.array(data.feature_names, dtype=str)),
        n_features=x.shape[1],
    )


@cache
def regressor() -> ModelFiles:
    """A ridge regression on the diabetes dataset."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    x, y = load_diabetes(return_X_y=True)
    x = x.astype(np.float32)
    model = Ridge().fit(x[:300], y[:300])
    return ModelFiles(
        onnx=to_onnx(model, x[:1], target_opset=17).SerializeToString(),
        suite=_npz(X=x[300:], y=y[300:]),
        reference=_npz(X=x[:300]),
        n_features=x.shape[1],
    )


def npz(**arrays: Any) -> bytes:
    """npz bytes of ``arrays``."""
    return _npz(**arrays)
