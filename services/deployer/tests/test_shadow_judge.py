"""The shadow phase's verdict on the monitor's overall comparison (pure logic)."""

from __future__ import annotations

from edgeloop.contracts.events import ShadowSpec
from edgeloop.deployer.shadow import judge

SPEC = ShadowSpec(min_agreement=0.9, min_compared=100)


def test_enough_agreement_on_enough_inputs_passes() -> None:
    passed, why = judge(SPEC, {"compared": 400, "agreement": 0.95})
    assert passed
    assert "95.0% of 400 inputs" in why


def test_too_little_agreement_fails_saying_how_much() -> None:
    passed, why = judge(SPEC, {"compared": 400, "agreement": 0.3})
    assert not passed
    assert "agrees with the champion on 30.0% of 400 inputs (at least 90.0% needed)" in why


def test_too_little_evidence_fails_naming_the_skips_over_budget() -> None:
    passed, why = judge(SPEC, {"compared": 12, "agreement": 1.0, "skipped_budget": 500})
    assert not passed
    assert "only 12 inputs compared (at least 100 needed)" in why
    assert "500 sampled inputs skipped over the challenger's budget" in why
    assert not judge(SPEC, {})[0]  # no comparison at all
