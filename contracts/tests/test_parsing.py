"""The forms people write rollouts in (the CLI's options, the console's fields)."""

from __future__ import annotations

import pytest

from edgeloop.contracts.parsing import parse_pairs, parse_selector, rollout_knobs


def test_pairs_and_selectors() -> None:
    assert parse_pairs(["lr=0.1", "", " depth = 3 \r"], "params") == {"lr": "0.1", "depth": "3"}
    assert parse_pairs(["k="], "params") == {"k": ""}
    assert parse_selector("site=a,ring=1") == {"site": "a", "ring": "1"}
    with pytest.raises(ValueError, match="params takes key=value, got 'lr'"):
        parse_pairs(["lr"], "params")
    with pytest.raises(ValueError, match="takes key=value"):
        parse_selector("=a")


def test_rollout_knobs_as_the_deployer_takes_them() -> None:
    assert rollout_knobs("1,50%,100%", "30s", "10%", "2m") == {
        "waves": [{"count": 1}, {"percent": 50.0}, {"percent": 100.0}],
        "bake_seconds": 30.0,
        "converge_timeout_seconds": 120.0,
        "max_failures_percent": 10.0,
    }
    assert rollout_knobs("", "", None, None, max_unavailable="2") == {"max_unavailable": 2}
    with pytest.raises(ValueError, match="invalid wave 'x'"):
        rollout_knobs("1,x", None, None, None)
    with pytest.raises(ValueError, match="invalid --max-failures 'some'"):
        rollout_knobs(None, None, "some", None)
