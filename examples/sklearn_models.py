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


def npz(**arrays: Any) -> bytes:
    """npz bytes of ``arrays``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@dataclass(frozen=True)
class Split:
    """A bundled dataset split into training and validation parts (stratified)."""

    feature_names: list[str]
    x_train: Any
    x_val: Any
    y_train: Any
    y_val: Any


def split(dataset: str, *, seed: int = 0) -> Split:
    """``sklearn.datasets.load_<dataset>`` split 70/30."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    data = getattr(datasets, f"load_{dataset}")()
    x = data.data.astype(np.float32)
    x_train, x_val, y_train, y_val = train_test_split(
        x, data.target, test_size=0.3, random_state=seed, stratify=data.target
    )
    return Split(list(data.feature_names), x_train, x_val, y_train, y_val)


def logistic(x: Any, y: Any, *, c: float = 1.0) -> Any:
    """A fitted standard-scaled logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x, y)


def logistic_onnx(model: Any, x: Any) -> bytes:
    """``model`` (from :func:`logistic`) as ONNX: labels and probabilities, no zipmap."""
    from skl2onnx import to_onnx

    onx = to_onnx(
        model, x[:1], options={id(model.steps[-1][1]): {"zipmap": False}}, target_opset=17
    )
    return bytes(onx.SerializeToString())


@cache
def classifier(dataset: str = "breast_cancer", *, c: float = 1.0, seed: int = 0) -> ModelFiles:
    """A logistic regression on a bundled dataset, split train/validation."""
    s = split(dataset, seed=seed)
    return ModelFiles(
        onnx=logistic_onnx(logistic(s.x_train, s.y_train, c=c), s.x_train),
        suite=npz(X=s.x_val, y=s.y_val),
        reference=npz(X=s.x_train, feature_names=np.array(s.feature_names, dtype=str)),
        n_features=s.x_train.shape[1],
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
        suite=npz(X=x[300:], y=y[300:]),
        reference=npz(X=x[:300]),
        n_features=x.shape[1],
    )
