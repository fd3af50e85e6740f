"""CBPE benchmark: what the label-free estimate costs where it runs.

- ``agent add``: the agent's aggregator per 256-inference batch with confidences
  (overall and per-class confidence histograms, the low-confidence sample) against the
  same aggregator given none — the same-run baseline; the difference bounds what the
  per-class histograms add from above.
- ``monitor estimate``: the estimate of a merged window (102,400 inferences, two
  classes), against scoring the same window without it (drift of 30 features with
  p-values, KPIs: what judging a window costs anyway) — the same-run baseline.
- ``nannyml``: NannyML's CBPE estimate (accuracy and F1) on as many raw rows (one
  chunk, fitted beforehand) — what a monitor working from raw inferences spends on it.

Estimation *error* per shift size is a test's table (``pytest -s tests/test_cbpe.py``).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bench.monitor_aggregate import FEATURES, _profile
from edgeloop.contracts.convert import telemetry_from_proto
from edgeloop.edge.telemetry import TelemetryAggregator, edges_from_profile
from edgeloop.monitor.aggregate import Reference, Window
from edgeloop.monitor.cbpe import estimate
from edgeloop.monitor.rules import score
from edgeloop.validator.calibration import fit

RECORDS = 256
BATCHES = 400


def _spread(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"min": round(v[0], 2), "median": round(statistics.median(v), 2), "max": round(v[-1], 2)}


def _once(rng: np.random.Generator, profile: dict[str, Any]) -> dict[str, float]:
    rows = rng.normal(0.1, 1.0, size=(BATCHES, RECORDS, FEATURES))
    proba = rng.uniform(0.5, 1.0, size=(BATCHES, RECORDS))
    labels = np.where(rng.random((BATCHES, RECORDS)) < 0.5, "0", "1")
    edges = edges_from_profile(profile, FEATURES)
    out: dict[str, float] = {}
    for name, with_conf in (("agent_add_us_per_batch", True), ("agent_add_baseline", False)):
        agg = TelemetryAggregator(
            feature_names=[f"f{j}" for j in range(FEATURES)], feature_edges=edges
        )
        start = time.perf_counter()
        for b in range(BATCHES):
            agg.add(rows[b], labels[b], proba[b] if with_conf else None, 1.0)
        out[name] = (time.perf_counter() - start) / BATCHES * 1e6
    ref = Reference.from_profile("bench", "1", profile)
    right = rng.random(5000) < 0.8
    cal = fit(np.where(right, "0", "1"), rng.uniform(0.5, 1.0, 5000), right, ["0", "1"])
    window = Window()
    agg = TelemetryAggregator(feature_names=[f"f{j}" for j in range(FEATURES)], feature_edges=edges)
    for b in range(BATCHES):
        agg.add(rows[b], labels[b], proba[b], 1.0)
        if b % 16 == 15:
            batch = agg.flush(device_id=f"d{b % 4}", model="bench", version="1", digest="")
            assert batch is not None
            window.add(telemetry_from_proto(batch), ref)
    start = time.perf_counter()
    for _ in range(1000):
        kpis = estimate(window, cal)
    out["estimate_us_per_window"] = (time.perf_counter() - start) / 1000 * 1e6
    assert "estimated_accuracy" in kpis
    start = time.perf_counter()
    for _ in range(10):
        score(window, ref)
    out["score_us_per_window_baseline"] = (time.perf_counter() - start) / 10 * 1e6
    out["nannyml_estimate_ms"] = _nannyml(rng, BATCHES * RECORDS) * 1e3
    return out


def _nannyml(rng: np.random.Generator, n: int) -> float:
    import pandas as pd

    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    import nannyml

    p = rng.uniform(0, 1, 5000)
    ref = pd.DataFrame({"p": p, "y_pred": (p > 0.5).astype(int), "y_true": rng.random(5000) < p})
    est = nannyml.CBPE(
        y_pred_proba="p",
        y_pred="y_pred",
        y_true="y_true",
        metrics=["accuracy", "f1"],
        problem_type="classification_binary",
        chunk_number=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(ref.assign(y_true=ref["y_true"].astype(int)))
    q = rng.uniform(0, 1, n)
    ana = pd.DataFrame({"p": q, "y_pred": (q > 0.5).astype(int)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "too few chunks": one window is one chunk here
        start = time.perf_counter()
        est.estimate(ana)
        return time.perf_counter() - start


def run(runs: int = 3) -> dict[str, Any]:
    """``runs`` repetitions; min/median/max of each figure, with the load average."""
    rng = np.random.default_rng(7)
    profile = _profile(rng, rng.normal(size=(5000, FEATURES)))
    results = [_once(rng, profile) for _ in range(max(runs, 1))]
    return {
        "benchmark": "cbpe",
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": len(results),
        "records_per_batch": RECORDS,
        "window_records": BATCHES * RECORDS,
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        **{key: _spread([r[key] for r in results]) for key in results[0]},
    }
