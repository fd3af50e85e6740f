"""Test models: the example trainer's real scikit-learn models (bundled datasets)."""

from examples.sklearn_models import ModelFiles, classifier, npz, regressor

__all__ = ["ModelFiles", "classifier", "npz", "regressor"]
