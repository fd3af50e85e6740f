"""Monitor benchmark: inference records aggregated per second on one core, from the bus
form of telemetry batches (JSON, 256 inferences each), and scipy on the raw data of the
same window as the peer baseline.

- ``parse+check+merge``: what the consumer does per message before its one write per
  window: parse the event, check it against the reference, merge it into the window.
- ``merge only``: the numpy merge of already parsed batches (where the time is not).
- ``score``: PSI, Jensen-Shannon, KS and chi² of the merged window against the reference.
- ``scipy raw``: for the same window as raw rows, ``np.histogram`` + ``ks_2samp`` +
  ``jensenshannon`` per feature — what a monitor working from raw inferences (as
  Evidently does with a reference and a current DataFrame) spends on the same window.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

from edgeloop.contracts.events import LATENCY_MS_EDGES, Histogram, TelemetryBatch
from edgeloop.monitor.aggregate import Reference, Window, check
from edgeloop.monitor.rules import score

FEATURES = 30
RECORDS = 256


def _profile(rng: np.random.Generator, ref_rows: np.ndarray) -> dict[str, Any]:
    features = []
    for j in range(FEATURES):
        col = ref_rows[:, j]
        edges = np.unique(np.quantile(col, np.linspace(0, 1, 11)[1:-1]))
        counts = np.bincount(np.searchsorted(edges, col, side="left"), minlength=len(edges) + 1)
        features.append(
            {"name": f"f{j}", "kind": "numeric", "edges": edges.tolist(), "counts": counts.tolist()}
        )
    return {
        "features": features,
        "prediction": {"kind": "categorical", "categories": ["0", "1"], "counts": [500, 500]},
    }


def run(batches: int = 4000) -> dict[str, Any]:
    """All figures, on this process's one core."""
    rng = np.random.default_rng(3)
    ref_rows = rng.normal(size=(5000, FEATURES))
    ref = Reference.from_profile("bench", "1", _profile(rng, ref_rows))
    now = datetime.now(UTC)
    raw: list[bytes] = []
    rows_all = []
    for b in range(batches):
        rows = rng.normal(0.1, 1.0, size=(RECORDS, FEATURES))
        rows_all.append(rows)
        hists = [
            Histogram(
                edges=ref.edges[j],
                counts=np.bincount(
                    np.searchsorted(ref.edges[j], rows[:, j], side="left"),
                    minlength=len(ref.edges[j]) + 1,
                ).tolist(),
            )
            for j in range(FEATURES)
        ]
        raw.append(
            TelemetryBatch(
                model="bench",
                version="1",
                device_id=f"d{b % 500}",
                window_start=now,
                window_end=now,
                count=RECORDS,
                feature_names=ref.names,
                feature_histograms=hists,
                prediction_counts={"0": 128, "1": 128},
                latency_ms_histogram=Histogram(
                    edges=list(LATENCY_MS_EDGES),
                    counts=[100, 100, 50, 6] + [0] * (len(LATENCY_MS_EDGES) - 3),
                ),
            )
            .model_dump_json()
            .encode()
        )
    total = batches * RECORDS

    # As the consumer does: each batch is parsed, checked, merged and dropped (keeping
    # 4,000 parsed batches alive would make every garbage collection walk them, and triple
    # the parse time — not what the service pays).
    t0 = time.perf_counter()
    window = Window()
    for data in raw:
        batch = TelemetryBatch.model_validate_json(data)
        check(batch, ref, max_count=100_000)
        window.add(batch, ref)
    full_s = time.perf_counter() - t0

    parsed = [TelemetryBatch.model_validate_json(data) for data in raw]
    t0 = time.perf_counter()
    again = Window()
    for batch in parsed:
        again.add(batch, ref)
    merge_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = score(window, ref)
    score_s = time.perf_counter() - t0

    current = np.concatenate(rows_all)
    t0 = time.perf_counter()
    for j in range(FEATURES):
        edges = np.asarray(ref.edges[j])
        bins = np.concatenate([[-np.inf], edges, [np.inf]])
        r_hist, _ = np.histogram(ref_rows[:, j], bins=bins)
        c_hist, _ = np.histogram(current[:, j], bins=bins)
        stats.ks_2samp(ref_rows[:, j], current[:, j])
        jensenshannon(r_hist, c_hist, base=2)
    scipy_s = time.perf_counter() - t0
    assert scores["count"] == total
    return {
        "records": total,
        "batches": batches,
        "features": FEATURES,
        "records_per_s_parse_check_merge": round(total / full_s),
        "records_per_s_merge_only": round(total / merge_s),
        "score_window_ms": round(score_s * 1000, 2),
        "scipy_raw_window_ms": round(scipy_s * 1000, 1),
    }
