"""Test models: the example trainer's real scikit-learn models (bundled datasets)."""

from onnx import TensorProto, helper

from examples.sklearn_models import (
    ModelFiles,
    classifier,
    logistic,
    logistic_onnx,
    npz,
    regressor,
    split,
)

__all__ = ["ModelFiles", "classifier", "failing_model", "npz", "regressor", "relabelled"]


def relabelled(dataset: str = "iris", shift: int = 1) -> bytes:
    """A classifier trained on labels moved by ``shift`` classes (``(y + shift) % k``):
    valid, confident, and wrong on nearly every input (a challenger that disagrees)."""
    s = split(dataset)
    k = int(s.y_train.max()) + 1
    return logistic_onnx(logistic(s.x_train, (s.y_train + shift) % k), s.x_train)


def failing_model(n_features: int = 4) -> bytes:
    """Loads fine, fails at inference: reshapes (rows x 4) into (3 x -1)."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [3, -1])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["X", "shape"], ["Y"])],
        "fails",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
