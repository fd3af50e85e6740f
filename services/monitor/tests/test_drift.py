"""Drift scores against scipy and a direct PSI, on real data (scikit-learn's bundled
datasets) with injected shifts."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon
from sklearn.datasets import load_breast_cancer, load_iris, load_wine

from edgeloop.monitor import drift

RNG = np.random.default_rng(7)


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = RNG.permutation(len(x))
    half = len(x) // 2
    return x[idx[:half]], x[idx[half:]]


def _bins(ref: np.ndarray, bins: int = 10) -> np.ndarray:
    """Decile edges of the reference, as the registry's profile computes them."""
    return np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))


def _hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """As the agent bins: v <= edges[0] is bin 0, v > edges[-1] the last bin."""
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)


def _direct_psi(ref: np.ndarray, cur: np.ndarray, edges: np.ndarray) -> float:
    """PSI written out, one bin at a time, from the raw values."""
    total = 0.0
    bounds = [-math.inf, *edges.tolist(), math.inf]
    for lo, hi in itertools.pairwise(bounds):
        r = max(float(np.mean((ref > lo) & (ref <= hi))), drift.EPS)
        c = max(float(np.mean((cur > lo) & (cur <= hi))), drift.EPS)
        total += (c - r) * math.log(c / r)
    return total


DATASETS = {"breast_cancer": load_breast_cancer, "wine": load_wine, "iris": load_iris}


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("shift", [0.0, 0.5, 2.0])
def test_scores_agree_with_scipy_and_a_direct_psi(name: str, shift: float) -> None:
    x = DATASETS[name]().data.astype(np.float64)
    ref, cur = _split(x)
    cur = cur.copy()
    cur[:, 0] += shift * ref[:, 0].std()  # the injected shift, on feature 0
    edges = [_bins(ref[:, j]) for j in range(x.shape[1])]
    ref_h = [_hist(ref[:, j], e) for j, e in enumerate(edges)]
    cur_h = [_hist(cur[:, j], e) for j, e in enumerate(edges)]
    for j in range(x.shape[1]):
        r, c = ref_h[j], cur_h[j]
        assert drift.psi(r, c) == pytest.approx(
            _direct_psi(ref[:, j], cur[:, j], edges[j]), abs=1e-12
        )
        assert drift.jensen_shannon(r, c) == pytest.approx(jensenshannon(r, c, base=2), abs=1e-12)
        exact = stats.ks_2samp(ref[:, j], cur[:, j]).statistic
        binned = drift.ks_binned(r, c).statistic[0]
        assert binned <= exact + 1e-12  # a lower bound …
        assert exact - binned <= drift.ks_tolerance(r, c)[0] + 1e-12  # … within the bin mass
    # vectorised over features gives the same as one at a time (same bin count per row)
    same = [j for j in range(x.shape[1]) if len(edges[j]) == len(edges[0])]
    stacked = drift.psi(np.stack([ref_h[j] for j in same]), np.stack([cur_h[j] for j in same]))
    assert stacked == pytest.approx([float(drift.psi(ref_h[j], cur_h[j])) for j in same])
    if shift >= 2.0:
        assert drift.psi(ref_h[0], cur_h[0]) > 0.25  # the shifted feature is flagged
        assert drift.ks_binned(ref_h[0], cur_h[0]).pvalue[0] < 0.01


def test_chi_square_agrees_with_scipy_on_categories() -> None:
    y = load_wine().target
    ref, cur = _split(y)
    cur = np.concatenate([cur, np.zeros(40, dtype=cur.dtype)])  # class 0 over-represented
    r = np.bincount(ref, minlength=3)
    c = np.bincount(cur, minlength=3)
    ours = drift.chi_square(r, c)
    theirs = stats.chisquare(c, f_exp=r / r.sum() * c.sum())
    assert ours.statistic[0] == pytest.approx(theirs.statistic, rel=1e-12)
    assert ours.pvalue[0] == pytest.approx(theirs.pvalue, rel=1e-9)
    assert ours.pvalue[0] < 0.01


@pytest.mark.parametrize("n_eff", [50, 999, 1000, 5000, 100_000, 1_000_000])
def test_ks_pvalue_matches_the_exact_distribution_at_every_size(n_eff: int) -> None:
    """Exact below KS_EXACT_BELOW, Stephens' asymptotic form above: within 0.005 of scipy's
    exact two-sided distribution at the same effective size (the largest gap of the
    asymptotic form, 0.0042, is at n = 1,000), and monotone in D."""
    # a reference of 2·n_eff inferences against a window of the same size: n·m/(n+m) = n_eff
    rng = np.random.default_rng(n_eff)
    r = np.vstack([rng.multinomial(2 * n_eff, np.full(10, 0.1)) for _ in range(8)])
    c = np.vstack(
        [
            rng.multinomial(2 * n_eff, np.linspace(1 - s, 1 + s, 10) / 10)
            for s in np.linspace(0, 0.3, 8)
        ]
    )
    got = drift.ks_binned(r, c)
    exact = stats.kstwo.sf(got.statistic, n_eff)
    assert np.all(np.abs(got.pvalue - exact) <= 0.005), (got.pvalue, exact)
    order = np.argsort(got.statistic)
    assert np.all(np.diff(got.pvalue[order]) <= 1e-12)


def test_chi_square_vectorised_rows_agree_with_one_at_a_time() -> None:
    """Rows with unseen bins, a single seen bin or an empty window score like each alone."""
    r = np.array([[10, 0, 30, 40], [0, 0, 50, 0], [5, 5, 5, 5], [1, 2, 3, 4]])
    c = np.array([[12, 7, 25, 41], [3, 4, 5, 6], [0, 0, 0, 0], [40, 30, 20, 10]])
    both = drift.chi_square(r, c)
    for i in range(len(r)):
        seen = r[i] > 0
        one = drift.chi_square(r[i], c[i])
        assert both.statistic[i] == pytest.approx(one.statistic[0])
        assert both.pvalue[i] == pytest.approx(one.pvalue[0])
        if seen.sum() >= 2 and c[i][seen].sum() > 0:
            theirs = stats.chisquare(
                c[i][seen], f_exp=r[i][seen] / r[i][seen].sum() * c[i][seen].sum()
            )
            assert one.statistic[0] == pytest.approx(theirs.statistic, rel=1e-12)
            assert one.pvalue[0] == pytest.approx(theirs.pvalue, rel=1e-9)
        else:
            assert (one.statistic[0], one.pvalue[0]) == (0.0, 1.0)


def test_identical_distributions_score_zero_and_empty_windows_are_safe() -> None:
    r = np.array([10, 20, 30, 40])
    assert drift.psi(r, r * 3) == pytest.approx(0.0)
    assert drift.jensen_shannon(r, r * 3) == pytest.approx(0.0)
    assert drift.ks_binned(r, r * 3).statistic[0] == pytest.approx(0.0)
    assert drift.chi_square(r, r * 3).statistic[0] == pytest.approx(0.0)
    empty = np.zeros(4)
    assert np.isfinite(drift.psi(r, empty))
    assert drift.chi_square(r, empty).pvalue[0] == 1.0
    assert drift.ks_binned(r, empty).pvalue[0] == 1.0


def test_canary_comparison() -> None:
    """A canary is judged against its baseline: errors, latency, predictions."""
    from edgeloop.contracts.events import Verdict
    from edgeloop.monitor.aggregate import Window
    from edgeloop.monitor.canary import compare

    def window(count: int, errors: int, latency: list[int], predictions: dict[str, int]) -> Window:
        return Window(
            count=count,
            errors=errors,
            latency_edges=[0.5, 1.0, 10.0, 50.0],
            latency=np.asarray(latency),
            predictions=predictions,
        )

    base = window(1000, 5, [900, 90, 10, 0, 0], {"0": 500, "1": 500})
    same = window(1000, 6, [850, 140, 10, 0, 0], {"0": 480, "1": 520})
    assert compare(same, base, {})[0] is Verdict.PASS
    # 0.5 ms → 1 ms is twice as slow but not slower by a real margin: still a pass
    assert (
        compare(window(1000, 5, [0, 1000, 0, 0, 0], {"0": 500, "1": 500}), base, {})[0]
        is Verdict.PASS
    )
    slow = window(1000, 5, [100, 100, 100, 700, 0], {"0": 500, "1": 500})
    verdict, reasons, _ = compare(slow, base, {})
    assert verdict is Verdict.FAIL
    assert "latency p95" in reasons[0]
    errors = window(1000, 80, [900, 90, 10, 0, 0], {"0": 500, "1": 500})
    assert "error rate 8.0%" in compare(errors, base, {})[1][0]
    skewed = window(1000, 5, [900, 90, 10, 0, 0], {"0": 990, "1": 10})
    assert "predictions differ" in compare(skewed, base, {})[1][0]
    assert compare(window(10, 0, [10, 0, 0, 0, 0], {"0": 10}), base, {})[0] is Verdict.INCONCLUSIVE


def test_custom_kpis_are_shares_of_predictions_with_bounds() -> None:
    from edgeloop.monitor.rules import judge, validate_rules

    rules = validate_rules({"min_count": 10, "kpis": {"flagged": {"predictions": [1], "max": 0.1}}})
    assert rules["kpis"] == {"flagged": {"predictions": ["1"], "max": 0.1}}
    scores = {"count": 100, "prediction_counts": {"0": 80, "1": 20}}
    (kpi,) = [j for j in judge(scores, rules) if j.rule == "kpi.flagged"]
    assert kpi.fired
    assert kpi.kind == "kpi"
    assert kpi.message == "flagged 20.0% above 0.1"
    calm = {"count": 100, "prediction_counts": {"0": 95, "1": 5}}
    (kpi,) = [j for j in judge(calm, rules) if j.rule == "kpi.flagged"]
    assert not kpi.fired
    assert kpi.clean
    for bad in (
        {"kpis": {"x": {"predictions": ["1"]}}},
        {"kpis": {"x": {"predictions": [], "max": 0.1}}},
        {"kpis": {"x": {"predictions": ["1"], "max": 2}}},
        {"kpis": {"bad name": {"predictions": ["1"], "max": 0.1}}},
    ):
        with pytest.raises(ValueError, match="KPI"):
            validate_rules(bad)
