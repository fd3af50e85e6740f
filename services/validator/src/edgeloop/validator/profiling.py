"""Latency and memory of a model at several intra-op thread counts."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil

from edgeloop.edge.runtime import OnnxModel


def profile(onnx: bytes, x: npt.NDArray[Any], threads: list[int], runs: int) -> dict[str, Any]:
    """p50/p95/p99 single-row latency and resident memory per thread count, and advice.

    Memory is the process's resident set growth while the session is loaded and running
    (sampled; onnxruntime allocates outside Python's heap, so tracemalloc would miss it).
    """
    proc = psutil.Process()
    rows = np.asarray(x[: max(1, min(len(x), 64))], dtype=np.float32)
    results: dict[str, Any] = {}
    for n in threads:
        before = proc.memory_info().rss
        model = OnnxModel(onnx, intra_op_threads=n)
        model.predict(rows[:1])  # warm-up
        peak = proc.memory_info().rss
        timings = []
        for i in range(runs):
            row = rows[i % len(rows) : i % len(rows) + 1]
            t0 = time.perf_counter()
            model.predict(row)
            timings.append((time.perf_counter() - t0) * 1000)
            if i % 50 == 0:
                peak = max(peak, proc.memory_info().rss)
        ms = np.asarray(timings)
        results[str(n)] = {
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)),
            "memory_mb": round(max(peak - before, 0) / 2**20, 2),
        }
        del model
    best = min(r["p95_ms"] for r in results.values())
    recommended = min(int(n) for n, r in results.items() if r["p95_ms"] <= best * 1.1)
    peak_mb = max(r["memory_mb"] for r in results.values())
    return {
        "threads": results,
        "recommended_threads": recommended,
        # headroom over the measured growth, plus the runtime itself
        "recommended_memory_limit_mb": int(np.ceil((peak_mb * 1.5 + 64) / 16) * 16),
    }
