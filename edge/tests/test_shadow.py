"""The challenger's sampling and budget on the device (pure logic: a stand-in model whose
inference advances a stand-in clock, so the budget's arithmetic is exact)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.edge.runtime import Prediction
from edgeloop.edge.shadow import ERROR_LABEL, Challenger
from edgeloop.edge.store import Installed
from edgeloop.edge.telemetry import TelemetryAggregator

ROWS = np.zeros((16, 2))


class SlowModel:
    """Predicts class 1 for every row, costing ``seconds`` of the stand-in clock."""

    def __init__(self, clock: list[float], seconds: float, fail: bool = False) -> None:
        self.clock, self.seconds, self.fail = clock, seconds, fail

    def predict(self, rows: Any) -> Prediction:
        self.clock[0] += self.seconds
        if self.fail:
            raise RuntimeError("broken")
        return Prediction(labels=np.ones(len(rows), dtype=np.int64))


def _challenger(sample: float, max_overhead: float, cost: float, fail: bool = False) -> Challenger:
    clock = [0.0]
    installed = Installed("m", "2", "sha256:" + "a" * 64, "sha256:" + "c" * 64, "/nowhere")
    return Challenger(
        desired=pb.DesiredState(manifest_digest="sha256:" + "a" * 64, rollout_id="r"),
        policy=pb.ShadowPolicy(sample=sample, max_overhead=max_overhead),
        installed=installed,
        model=SlowModel(clock, cost, fail),  # type: ignore[arg-type]
        aggregator=TelemetryAggregator(feature_names=["a", "b"], max_samples=0),
        labels=["zero", "one"],
        rng=random.Random(7),
        clock=lambda: clock[0],
    )


def test_a_challenger_over_its_budget_is_skipped_and_the_skips_counted() -> None:
    # four times the champion's cost, allowed half of it: about one batch in eight runs
    c = _challenger(sample=1.0, max_overhead=0.5, cost=0.004)
    for _ in range(400):
        c.observe(ROWS, ["one"] * 16, 0.001)
    t = c.tally
    assert t.skipped_budget > 0
    assert t.compared + t.skipped_budget == 400 * 16
    # never more than one batch over the budget
    assert t.challenger_seconds <= 0.5 * t.champion_seconds + 0.004
    assert t.compared >= 16 * 40
    assert c.aggregator.count == t.compared


def test_a_sampled_share_runs_within_budget_and_compares_like_for_like() -> None:
    c = _challenger(sample=0.2, max_overhead=0.5, cost=0.001)
    for _ in range(1000):
        c.observe(ROWS, ["zero"] * 8 + ["one"] * 8, 0.001)
    t = c.tally
    assert t.skipped_budget == 0
    assert 0.15 < t.compared / (t.compared + t.sampled_out) < 0.25
    assert t.agreed == t.compared // 2  # it says "one" for all: half agree
    assert t.flips == {("zero", "one"): t.compared // 2}
    comparison = t.take("r", _champion())
    assert comparison.compared == comparison.agreed * 2
    assert t.compared == 0  # a new window


def test_a_challenger_that_fails_counts_as_flipped_to_an_error() -> None:
    c = _challenger(sample=1.0, max_overhead=10, cost=0.0001, fail=True)
    c.observe(ROWS, ["one"] * 16, 0.001)
    assert c.tally.flips == {("one", ERROR_LABEL): 16}
    assert c.aggregator.count == 16


def _champion() -> Installed:
    return Installed("m", "1", "sha256:" + "b" * 64, "sha256:" + "d" * 64, "/nowhere")
