"""The label-free estimate of a window (``edgeloop.monitor.cbpe``) from the histograms
agents send: per predicted class from current agents, pooled from older ones that send
only the overall confidence histogram, and both in one window of a mixed fleet."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from edgeloop.contracts.calibration import BinCalibration, CalibrationMap
from edgeloop.contracts.events import CONFIDENCE_EDGES, Histogram, TelemetryBatch
from edgeloop.monitor.aggregate import Reference, Window
from edgeloop.monitor.cbpe import estimate
from edgeloop.monitor.rules import judge, score, validate_rules

BINS = len(CONFIDENCE_EDGES) + 1
PROFILE = {"features": [{"name": "f", "edges": [0.0], "counts": [1, 1]}]}


def _curve(accuracy: float) -> BinCalibration:
    return BinCalibration(count=[0] * BINS, correct=[0] * BINS, accuracy=[accuracy] * BINS)


CAL = CalibrationMap(
    classes=["0", "1"],
    positive="1",
    suite_rows=0,
    pooled=_curve(0.8),
    by_class={"0": _curve(0.9), "1": _curve(0.6)},
)


def _counts(n: int) -> list[int]:
    return [0] * (BINS - 1) + [n]  # all in the top bin


def _batch(device: str, predictions: dict[str, int], *, per_class: bool) -> TelemetryBatch:
    n = sum(predictions.values())
    now = datetime.now(UTC)
    return TelemetryBatch(
        model="m",
        version="1",
        device_id=device,
        window_start=now,
        window_end=now,
        count=n,
        feature_names=["f"],
        feature_histograms=[Histogram(edges=[0.0], counts=[n, 0])],
        prediction_counts=predictions,
        confidence_histogram=Histogram(edges=list(CONFIDENCE_EDGES), counts=_counts(n)),
        confidence_by_prediction={
            label: Histogram(edges=list(CONFIDENCE_EDGES), counts=_counts(k))
            for label, k in predictions.items()
        }
        if per_class
        else {},
    )


def _window(*batches: TelemetryBatch) -> Window:
    ref = Reference.from_profile("m", "1", PROFILE)
    window = Window()
    for b in batches:
        window.add(b, ref)
    return Window.from_json(window.to_json())  # as stored


def test_per_class_counts_give_accuracy_and_f1() -> None:
    got = estimate(_window(_batch("a", {"0": 60, "1": 40}, per_class=True)), CAL)
    assert got["estimated_accuracy"] == pytest.approx((60 * 0.9 + 40 * 0.6) / 100)
    tp, fp, fn = 40 * 0.6, 40 * 0.4, 60 * 0.1
    assert got["estimated_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_an_older_agent_is_estimated_with_the_pooled_curve_and_without_f1() -> None:
    got = estimate(_window(_batch("old", {"0": 60, "1": 40}, per_class=False)), CAL)
    assert got == {"estimated_accuracy": pytest.approx(0.8)}


def test_a_mixed_fleet_counts_each_agent_its_way() -> None:
    window = _window(
        _batch("new", {"0": 50, "1": 50}, per_class=True),
        _batch("old", {"0": 100}, per_class=False),
    )
    got = estimate(window, CAL)
    assert got == {"estimated_accuracy": pytest.approx((50 * 0.9 + 50 * 0.6 + 100 * 0.8) / 200)}
    # leaving a device out (robustness to one device) takes its per-class counts too
    alone = estimate(window.without({"old"}), CAL)
    assert alone["estimated_accuracy"] == pytest.approx(0.75)


def test_no_map_or_other_bins_no_estimate() -> None:
    window = _window(_batch("a", {"0": 10}, per_class=True))
    assert estimate(window, None) == {}
    assert estimate(window, CAL.model_copy(update={"edges": [0.5]})) == {}


def test_the_rule_fires_below_and_clears_above_with_hysteresis() -> None:
    ref = Reference.from_profile("m", "1", PROFILE)
    ref = Reference(**{**ref.__dict__, "calibration": CAL})
    low = score(_window(_batch("a", {"1": 300}, per_class=True)), ref)  # 0.6
    high = score(_window(_batch("a", {"0": 300}, per_class=True)), ref)  # 0.9
    rules = {"min_count": 100, "estimated_accuracy": 0.85}
    (fired,) = [j for j in judge(low, rules) if j.rule == "estimated_accuracy"]
    assert fired.fired
    assert not fired.clean
    (fine,) = [j for j in judge(high, rules) if j.rule == "estimated_accuracy"]
    assert not fine.fired
    assert fine.clean  # 1 - 0.9 < (1 - 0.85) * 0.8
    assert not [j for j in judge(low, {"min_count": 100}) if j.rule.startswith("estimated")]
    with pytest.raises(ValueError, match="out of range"):
        validate_rules({"estimated_accuracy": 1.5})
