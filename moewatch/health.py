"""Health classification (DESIGN section 3): each metric to a state, a layer to its worst metric's state,
a run to its worst layer's. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from moewatch.config import Thresholds
from moewatch.report import HealthState

__all__ = ["Classification", "classify_layer", "worst"]

H, W, C = HealthState.HEALTHY, HealthState.WARNING, HealthState.COLLAPSED


@dataclass(frozen=True)
class Classification:
    state: HealthState
    reasons: list[str]


def _upper(name: str, value: float | None, warn: float, collapse: float, strict_warn: bool) -> tuple[HealthState, str]:
    """Metrics where bigger is worse: collapsed above ``collapse``; warning above (or at) ``warn``."""
    if value is None:
        return H, ""
    if value > collapse:
        return C, f"{name} {value:.3g} > {collapse:g} (collapsed)"
    if value > warn or (not strict_warn and value >= warn):
        return W, f"{name} {value:.3g} >{'' if strict_warn else '='} {warn:g} (warning)"
    return H, ""


def classify_layer(
    *,
    load_cov: float | None,
    dead_ratio: float,
    top2_excess: float | None,
    norm_entropy: float | None,
    fair_share: float,
    min_fair_share: float,
    thresholds: Thresholds,
) -> Classification:
    """Classify one layer. Windows whose fair share is below ``min_fair_share`` are ``insufficient_data``:
    sampling noise alone gives a CV of about ``1/sqrt(f)`` there."""
    if fair_share < min_fair_share or fair_share <= 0:
        return Classification(
            HealthState.INSUFFICIENT_DATA,
            [f"fair share {fair_share:.3g} assignments/expert < min_fair_share {min_fair_share:g}"],
        )
    t = thresholds
    checks = [
        _upper("load_cov", load_cov, t.load_cov_warning, t.load_cov_collapsed, strict_warn=False),
        _upper("dead_ratio", dead_ratio, t.dead_ratio_warning, t.dead_ratio_collapsed, strict_warn=True),
        _upper("top2_excess", top2_excess, t.top2_excess_warning, t.top2_excess_collapsed, strict_warn=True),
    ]
    if norm_entropy is not None:
        if norm_entropy < t.entropy_collapsed:
            checks.append((C, f"norm_entropy {norm_entropy:.3g} < {t.entropy_collapsed:g} (collapsed)"))
        elif norm_entropy <= t.entropy_warning:
            checks.append((W, f"norm_entropy {norm_entropy:.3g} <= {t.entropy_warning:g} (warning)"))
    state = worst(s for s, _ in checks)
    return Classification(state, [r for s, r in checks if s is not H])


def worst(states: Iterable[HealthState]) -> HealthState:
    """Worst state; ``insufficient_data`` only when every state is (or there are none)."""
    result = HealthState.INSUFFICIENT_DATA
    for s in states:
        if s.severity > result.severity:
            result = s
    return result
