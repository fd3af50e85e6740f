"""One ONNX inference path for the device, the validator and the registry.

``OnnxModel`` wraps an onnxruntime session of a tabular model (one 2-D float input) and
normalises what scikit-learn-onnx and other exporters emit: a classifier gives labels
and class probabilities (as a tensor, or as a sequence of maps when ZipMap is on), a
regressor gives values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort


class OutputShapeError(ValueError):
    """The model's output does not have one row per input row."""


class ModelLoadError(ValueError):
    """The bytes are not an ONNX model onnxruntime can run, or not one edgeloop serves."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape (None for a dynamic dimension) of a model input/output."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON form, for model.json and the registry."""
        return {"name": self.name, "type": self.type, "shape": list(self.shape)}


@dataclass(frozen=True)
class Prediction:
    """Outputs of one batch: labels (classifier) or values (regressor)."""

    labels: npt.NDArray[Any] | None = None
    probabilities: npt.NDArray[np.float32] | None = None
    values: npt.NDArray[np.float32] | None = None
    classes: list[Any] = field(default_factory=list)

    @property
    def confidence(self) -> npt.NDArray[np.float32] | None:
        """Top-class probability per row (classifiers)."""
        if self.probabilities is None:
            return None
        return np.asarray(self.probabilities.max(axis=1), dtype=np.float32)


class OnnxModel:
    """A loaded tabular ONNX model."""

    def __init__(self, data: bytes, *, intra_op_threads: int = 1) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                data, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"not a model onnxruntime can load: {first}") from exc
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        if len(self.inputs) != 1:
            raise ModelLoadError(
                f"edgeloop serves models with one tabular input; this one has "
                f"{len(self.inputs)} ({', '.join(i.name for i in self.inputs)})"
            )
        shape = self.inputs[0].shape
        if len(shape) != 2:
            raise ModelLoadError(
                f"input {self.inputs[0].name!r} must be 2-D (rows x features), has shape {shape}"
            )
        self.n_features: int | None = shape[1] if isinstance(shape[1], int) else None
        self.kind = "classifier" if self._label_output() is not None else "regressor"

    def _label_output(self) -> str | None:
        names = [o.name for o in self.outputs]
        if len(self.outputs) >= 2 and ("label" in names or "output_label" in names):
            return "label" if "label" in names else "output_label"
        return None

    def check_features(self, x: npt.NDArray[Any], what: str) -> npt.NDArray[np.float32]:
        """``x`` as float32 rows x features, or a ValueError that says why not."""
        arr = np.asarray(x)
        if arr.ndim != 2:
            raise ValueError(f"{what} must be 2-D (rows x features), got shape {arr.shape}")
        if self.n_features is not None and arr.shape[1] != self.n_features:
            raise ValueError(
                f"{what} has {arr.shape[1]} features but the model's input "
                f"{self.inputs[0].name!r} takes {self.n_features}"
            )
        try:
            return arr.astype(np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} is not numeric: {exc}") from exc

    def predict(self, x: npt.NDArray[Any]) -> Prediction:
        """Run the model on a batch of rows."""
        feats = self.check_features(x, "input")
        results = self.session.run(None, {self.inputs[0].name: feats})
        by_name = {o.name: r for o, r in zip(self.outputs, results, strict=True)}
        first = results[0]
        rows = len(first) if isinstance(first, list) else np.asarray(first).shape[0]
        if rows != len(feats):
            raise OutputShapeError(
                f"wrong output shape: {len(feats)} input rows gave {rows} output rows "
                f"(output {self.outputs[0].name!r})"
            )
        label_name = self._label_output()
        if label_name is None:
            values = np.asarray(results[0], dtype=np.float32).reshape(len(feats), -1)
            return Prediction(values=values[:, 0] if values.shape[1] == 1 else values)
        labels = np.asarray(by_name[label_name]).reshape(-1)
        prob_out = next(o.name for o in self.outputs if o.name != label_name)
        raw = by_name[prob_out]
        if isinstance(raw, list):  # ZipMap: one {class: p} per row
            classes = list(raw[0].keys()) if raw else []
            probs = np.array([[row[c] for c in classes] for row in raw], dtype=np.float32)
        else:
            probs = np.asarray(raw, dtype=np.float32)
            # Without ZipMap the class labels are not in the outputs; the columns follow
            # the sorted class labels (scikit-learn's classes_), which the labels seen in
            # this batch give when every class occurs, else their positions.
            seen = sorted(np.unique(labels).tolist())
            classes = seen if len(seen) == probs.shape[1] else list(range(probs.shape[1]))
        return Prediction(labels=labels, probabilities=probs, classes=classes)

    def signature(self) -> dict[str, Any]:
        """Inputs, outputs and kind, for model.json and the registry."""
        return {
            "kind": self.kind,
            "inputs": [i.as_dict() for i in self.inputs],
            "outputs": [o.as_dict() for o in self.outputs],
        }


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int | str) else None for d in node.shape or ())
    return TensorSpec(name=node.name, type=str(node.type), shape=shape)
