"""Health classification (DESIGN section 3): each metric to a state, a layer to its worst metric's state,
a run to its worst layer's. Pure functions.

Noise-aware: a metric is judged against a threshold only where that threshold is clear of the window's
sampling-noise floor (:mod:`moewatch.noise`), so a balanced router raises a false alarm in at most
``false_alarm_rate`` of its layer-windows per metric. A metric whose warning threshold lies inside the
noise reads ``insufficient_data`` ("not enough data") with the reason; its collapsed threshold is still
judged when that one is clear.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from moewatch.config import Thresholds
from moewatch.noise import NoiseFloor
from moewatch.report import HealthState

__all__ = ["Classification", "classify_layer", "worst"]

H, W, C, N = HealthState.HEALTHY, HealthState.WARNING, HealthState.COLLAPSED, HealthState.INSUFFICIENT_DATA


@dataclass(frozen=True)
class Classification:
    state: HealthState
    reasons: list[str]
    metric_states: dict[str, HealthState] = field(default_factory=dict)
    not_enough_data: dict[str, str] = field(default_factory=dict)


def _noisy(name: str, floor: float, bound: float, level: str, fair: float, upper: bool) -> str:
    side = "reaches" if upper else "falls to"
    return (
        f"not enough data: a balanced router's {name} {side} {floor:.3g} by chance at {fair:.3g} assignments/expert, "
        f"not clear of the {level} threshold {bound:g}"
    )


def _upper(
    name: str, value: float | None, warn: float, collapse: float, strict_warn: bool, floor: float | None, fair: float
) -> tuple[HealthState, str] | None:
    """Bigger is worse: collapsed above ``collapse``; warning above (or at) ``warn``. ``None``: undefined."""
    if value is None:
        return None
    collapse_ok = floor is None or floor <= collapse
    warn_ok = floor is None or (floor <= warn if strict_warn else floor < warn)
    if value > collapse and collapse_ok:
        return C, f"{name} {value:.3g} > {collapse:g} (collapsed)"
    if not warn_ok:
        assert floor is not None
        return N, _noisy(name, floor, warn, "warning", fair, upper=True)
    if value > warn or (not strict_warn and value >= warn):
        return W, f"{name} {value:.3g} >{'' if strict_warn else '='} {warn:g} (warning)"
    return H, ""


def _entropy(value: float | None, t: Thresholds, floor: float | None, fair: float) -> tuple[HealthState, str] | None:
    if value is None:
        return None
    collapse_ok = floor is None or floor >= t.entropy_collapsed
    warn_ok = floor is None or floor > t.entropy_warning
    if value < t.entropy_collapsed and collapse_ok:
        return C, f"norm_entropy {value:.3g} < {t.entropy_collapsed:g} (collapsed)"
    if not warn_ok:
        assert floor is not None
        return N, _noisy("norm_entropy", floor, t.entropy_warning, "warning", fair, upper=False)
    if value <= t.entropy_warning:
        return W, f"norm_entropy {value:.3g} <= {t.entropy_warning:g} (warning)"
    return H, ""


def classify_layer(
    *,
    load_cov: float | None,
    dead_ratio: float,
    top2_excess: float | None,
    norm_entropy: float | None,
    fair_share: float,
    thresholds: Thresholds,
    noise: NoiseFloor | None = None,
    min_fair_share: float = 0.0,
) -> Classification:
    """Classify one layer. ``noise`` gives the window's noise floors (``None``: judge every threshold).
    ``min_fair_share`` is the deprecated blanket guard: windows below it are ``insufficient_data``."""
    if fair_share <= 0 or fair_share < min_fair_share:
        why = (
            "no assignments in this window"
            if fair_share <= 0
            else f"fair share {fair_share:.3g} assignments/expert < min_fair_share {min_fair_share:g}"
        )
        return Classification(N, [why], {}, {"window": why})
    t, n = thresholds, noise
    checks = {
        "load_cov": _upper(
            "load_cov", load_cov, t.load_cov_warning, t.load_cov_collapsed, False, n and n.load_cov, fair_share
        ),
        "dead_ratio": _upper(
            "dead_ratio", dead_ratio, t.dead_ratio_warning, t.dead_ratio_collapsed, True, n and n.dead_ratio, fair_share
        ),
        "top2_excess": _upper(
            "top2_excess", top2_excess, t.top2_excess_warning, t.top2_excess_collapsed, True,
            n and n.top2_excess, fair_share,
        ),
        "norm_entropy": _entropy(norm_entropy, t, n and n.norm_entropy, fair_share),
    }
    judged = {name: c for name, c in checks.items() if c is not None}
    state = worst(s for s, _ in judged.values())
    noisy = {name: r for name, (s, r) in judged.items() if s is N}
    reasons = [r for s, r in judged.values() if s in (W, C)]
    if state is N:
        reasons = list(noisy.values())
    return Classification(state, reasons, {name: s for name, (s, _) in judged.items()}, noisy)


def worst(states: Iterable[HealthState]) -> HealthState:
    """Worst state; ``insufficient_data`` only when every state is (or there are none)."""
    result = HealthState.INSUFFICIENT_DATA
    for s in states:
        if s.severity > result.severity:
            result = s
    return result
