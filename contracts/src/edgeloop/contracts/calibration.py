"""The calibration map of a classifier: what the validator learns from the suite and the
monitor uses to estimate accuracy without labels (confidence-based performance
estimation, CBPE).

It travels in the validation report (``ValidationPassed.report["calibration"]``), which
the registry keeps with the version (``validation_detail.report``) and serves to the
monitor with the reference profile.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator

from edgeloop.contracts.events import CONFIDENCE_EDGES

REPORT_KEY = "calibration"
"""Where the map sits in a validation report."""


class BinCalibration(BaseModel):
    """One calibration curve on the confidence bins (``CONFIDENCE_EDGES`` + 1 bins)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    count: list[NonNegativeInt] = Field(description="suite predictions per confidence bin")
    correct: list[NonNegativeInt] = Field(description="of which were right")
    accuracy: list[float] = Field(
        description="fitted P(prediction right | its confidence bin): smoothed, monotone"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not len(self.count) == len(self.correct) == len(self.accuracy):
            raise ValueError("count, correct and accuracy need one entry per bin each")
        if any(k > n for k, n in zip(self.correct, self.count, strict=True)):
            raise ValueError("more correct predictions than predictions in a bin")
        if any(not 0.0 <= a <= 1.0 for a in self.accuracy):
            raise ValueError("a fitted accuracy is outside [0, 1]")
        return self


class CalibrationMap(BaseModel):
    """Per predicted class (and pooled over all of them), the suite's accuracy per
    confidence bin of the predicted class, on the bins agents histogram confidence on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["histogram-binning"] = "histogram-binning"
    edges: list[float] = Field(default_factory=lambda: list(CONFIDENCE_EDGES))
    classes: list[str] = Field(description="the model's classes, as telemetry names them")
    positive: str | None = Field(
        default=None, description="binary classifiers: the class F1 is computed for"
    )
    suite_rows: NonNegativeInt
    pooled: BinCalibration
    by_class: dict[str, BinCalibration] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _on_edges(self) -> Self:
        bins = len(self.edges) + 1
        for curve in (self.pooled, *self.by_class.values()):
            if len(curve.count) != bins:
                raise ValueError(f"a calibration curve has {len(curve.count)} bins, not {bins}")
        if self.positive is not None and self.positive not in self.classes:
            raise ValueError(f"positive class {self.positive!r} is not one of the classes")
        return self
