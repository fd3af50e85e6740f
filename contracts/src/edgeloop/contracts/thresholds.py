"""Quality thresholds of a model version: ``threshold.<metric>`` params, what the
validator holds a version to, and the platform's minimum bars below which only an admin
may set them (the registry checks at registration)."""

from __future__ import annotations

from collections.abc import Mapping

#: Params named ``threshold.<metric>`` set the version's bar on ``metric``.
THRESHOLD_PREFIX = "threshold."

#: Metrics where higher is better; the others (errors) are better lower.
HIGHER_IS_BETTER = frozenset({"accuracy", "f1_macro", "roc_auc"})

#: The headline metrics of each kind of model (the validator reports them).
HEADLINE = {"classifier": ("accuracy", "f1_macro", "roc_auc"), "regressor": ("mae", "rmse")}


class ThresholdError(ValueError):
    """A threshold that is not a number (the message names it)."""


class BelowMinimum(ValueError):
    """A threshold looser than the platform's minimum, set by someone who may not."""


def thresholds(params: Mapping[str, str]) -> dict[str, float]:
    """The thresholds in a version's params (``threshold.accuracy=0.9`` → accuracy 0.9)."""
    out: dict[str, float] = {}
    for key, value in sorted(params.items()):
        if key.startswith(THRESHOLD_PREFIX):
            try:
                out[key.removeprefix(THRESHOLD_PREFIX)] = float(value)
            except ValueError:
                raise ThresholdError(f"param {key}={value!r} is not a number") from None
    return out


def looser(metric: str, bound: float, minimum: float) -> bool:
    """Whether ``bound`` on ``metric`` lets through what ``minimum`` would not."""
    return bound < minimum if metric in HIGHER_IS_BETTER else bound > minimum


def apply_minimums(
    params: Mapping[str, str],
    minimums: Mapping[str, float],
    kind: str | None,
    *,
    may_loosen: bool,
) -> dict[str, str]:
    """``params`` held to the platform's ``minimums``: a threshold looser than one is
    :class:`BelowMinimum` unless ``may_loosen`` (an admin); a headline metric of ``kind``
    with a minimum and no threshold gets the minimum as its threshold."""
    given = thresholds(params)
    for metric, bound in given.items():
        minimum = minimums.get(metric)
        if minimum is not None and looser(metric, bound, minimum) and not may_loosen:
            limit = "at least" if metric in HIGHER_IS_BETTER else "at most"
            raise BelowMinimum(
                f"threshold.{metric}={bound:g} is looser than the platform's minimum: "
                f"{metric} must be {limit} {minimum:g}; only an admin may set a looser "
                "threshold"
            )
    out = dict(params)
    for metric in HEADLINE.get(kind or "", ()):
        if metric in minimums and metric not in given:
            out[f"{THRESHOLD_PREFIX}{metric}"] = f"{minimums[metric]:g}"
    return out
