"""`edgeloop shadow report` and the shadow line of `rollout status` (rendering only)."""

from __future__ import annotations

from typing import Any

from edgeloop.cli import rollout, shadow

PART: dict[str, Any] = {
    "compared": 400,
    "agreed": 380,
    "agreement": 0.95,
    "flip_matrix": {"setosa": {"setosa": 100}, "versicolor": {"versicolor": 280, "virginica": 20}},
    "latency": {
        "champion_p50_ms": 0.05,
        "challenger_p50_ms": 0.1,
        "ratio_p50": 2.0,
        "champion_p99_ms": 0.5,
        "challenger_p99_ms": 1.0,
        "ratio_p99": 2.0,
    },
    "prediction_psi": 0.012,
    "sampled_out": 1600,
    "skipped_budget": 16,
    "overhead_max": 0.41,
    "devices": 10,
}


def test_the_report_shows_agreement_flips_latency_and_budget_per_group() -> None:
    text = shadow.render(
        {
            "model": "iris",
            "version": "2",
            "rollouts": ["r1"],
            "champion_versions": ["1"],
            "overall": PART,
            "groups": {"lab": PART},
        }
    )
    assert "challenger iris@2 against champion 1" in text
    assert "400 inputs compared on 10 devices, agreement 95.0%, prediction PSI 0.012" in text
    assert "p50 2.00x" in text
    assert "16 sampled skipped over budget" in text
    assert "versicolor → versicolor: 280, virginica: 20" in text
    assert "group lab" in text
    empty = {"model": "iris", "version": "2", "groups": {}}
    assert "no comparison yet" in shadow.render(empty)


def test_rollout_status_shows_the_shadow_phase_and_its_verdict() -> None:
    r = {
        "model": "iris",
        "version": "2",
        "shadow": {
            "sample": 0.2,
            "duration_seconds": 3600,
            "min_agreement": 0.9,
            "min_compared": 100,
            "then_waves": True,
        },
        "shadow_state": "failed",
        "shadow_result": {"verdict": "failed", "reason": "agrees on 12.0% of 400 inputs"},
    }
    lines = rollout._shadow_line(r)
    assert "shadow phase failed: sample 0.2, 3600 s" in lines[0]
    assert "then the waves" in lines[0]
    assert lines[1].strip() == "failed: agrees on 12.0% of 400 inputs"
    assert rollout._shadow_line({"shadow": None}) == []
