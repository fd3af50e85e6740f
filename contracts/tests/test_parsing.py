"""The forms people write rollouts in (the CLI's options, the console's fields)."""

from __future__ import annotations

import pytest

from edgeloop.contracts.parsing import (
    format_pairs,
    format_rules,
    format_waves,
    parse_pairs,
    parse_rules,
    parse_selector,
    parse_waves,
    release_policy,
    rollout_knobs,
)


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


def test_a_release_policy_as_the_deployer_takes_it() -> None:
    body = release_policy(True, "fleet=iris", "10%,100%", "5s", "10%", approval="after-first-wave")
    assert body == {
        "auto_rollout": True,
        "selector": {"fleet": "iris"},
        "approval": "after_first_wave",
        "approval_labels": None,
        "waves": [{"percent": 10.0}, {"percent": 100.0}],
        "bake_seconds": 5.0,
        "max_failures_percent": 10.0,
    }
    assert release_policy(False, "", None, None, None, approval_labels="env=prod") == {
        "auto_rollout": False,
        "selector": None,
        "approval": "none",
        "approval_labels": {"env": "prod"},
    }
    with pytest.raises(ValueError, match="approval is none, before-rollout or after-first-wave"):
        release_policy(False, "", None, None, None, approval="always")
    with pytest.raises(ValueError, match="the approval labels takes key=value"):
        release_policy(False, "", None, None, None, approval_labels="prod")


def test_selectors_and_waves_written_back() -> None:
    assert format_pairs({"site": "a", "fleet": "x"}) == "fleet=x,site=a"
    assert format_pairs(None) == ""
    assert format_waves([{"count": 1}, {"percent": 12.5}, {"percent": 100.0}]) == "1, 12.5%, 100%"
    assert parse_waves(format_waves([{"count": 1}, {"percent": 50.0}])) == parse_waves("1,50%")


def test_monitor_rules_as_yaml() -> None:
    text = "prediction_psi: 0.6\nkpis:\n  flagged: {predictions: ['1'], max: 0.2}\n"
    rules = parse_rules(text)
    assert rules == {"prediction_psi": 0.6, "kpis": {"flagged": {"predictions": ["1"], "max": 0.2}}}
    assert parse_rules(format_rules(rules)) == rules
    assert parse_rules("") == {}
    assert format_rules({}) == ""
    with pytest.raises(ValueError, match="rules-file must be a mapping of rule: number"):
        parse_rules("- 1\n- 2", "rules-file")
    with pytest.raises(ValueError, match="the rules are not YAML"):
        parse_rules("a: [1,")
