"""Health classification (README, "Metrics and health"): each metric to a state, a layer to its worst metric's state,
a run to its worst layer's. Pure functions.

Noise-aware: a metric is judged against a threshold only where that threshold is clear of the window's
sampling-noise floor (:mod:`moewatch.noise`), so a balanced router raises a false alarm in at most
``false_alarm_rate`` of its layer-windows per metric. A metric whose warning threshold lies inside the
noise reads ``insufficient_data`` ("not enough data") with the reason; its collapsed threshold is still
judged when that one is clear.

Broken router outputs are not a question of sampling noise: a layer with any non-finite router output
(``nonfinite``: NaN/inf logits or probabilities among the sampled rows) or any expert id outside
``[0, E)`` (``invalid_ids``) is at least ``warning``, with a reason naming the count, and is never
``healthy`` or ``insufficient_data`` (not even when no valid assignment is left, e.g. every id invalid).
These faults do not by themselves make a layer ``collapsed``: that state stays a statement about the load
distribution of the valid assignments. Their urgency is carried by their own alerts (``nonfinite``
critical, ``invalid_ids`` warning; :mod:`moewatch.alerting`), which hold back the layer's ``warning``
alert while they fire.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from moewatch.config import Thresholds
from moewatch.noise import NoiseFloor
from moewatch.report import HealthState

__all__ = ["BOUNDS", "Bound", "Classification", "OutputFaults", "classify_layer", "worst"]

H, W, C, N = HealthState.HEALTHY, HealthState.WARNING, HealthState.COLLAPSED, HealthState.INSUFFICIENT_DATA


@dataclass(frozen=True)
class OutputFaults:
    """Broken router outputs of one layer in one window, from the exact device counts (no sampling noise)."""

    num_experts: int
    assignments: int = 0  # valid expert ids
    invalid_ids: int = 0  # expert ids outside [0, num_experts)
    invalid_below: int = 0  # of them, ids below 0 (the rest are >= num_experts)
    nonfinite: int = 0  # non-finite rows among the sampled router outputs (logits or probabilities)
    sampled_rows: int = 0

    def reasons(self) -> dict[str, str]:
        """A reason per failing check (each makes the layer ``warning``)."""
        out: dict[str, str] = {}
        if self.nonfinite > 0:
            of = f" of {self.sampled_rows} sampled" if self.sampled_rows >= self.nonfinite else ""
            out["nonfinite"] = f"nonfinite {self.nonfinite}{of} router output rows are NaN/inf (warning)"
        if self.invalid_ids > 0:
            e, below = self.num_experts, self.invalid_below
            above = self.invalid_ids - below
            where = ", ".join(p for p, n in ((f"{below} below 0", below), (f"{above} >= {e}", above)) if n > 0)
            out["invalid_ids"] = (
                f"invalid_ids {self.invalid_ids} of {self.invalid_ids + self.assignments} expert ids outside "
                f"[0, {e}) ({where}): a broken router or adapter (warning)"
            )
        return out


@dataclass(frozen=True)
class Classification:
    state: HealthState
    reasons: list[str]
    metric_states: dict[str, HealthState] = field(default_factory=dict)
    not_enough_data: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Bound:
    """How one metric is judged against its two :class:`Thresholds` fields: the one statement of the
    comparisons, read by the classifier, the alert engine, the dashboards' bands and the offline report.

    ``higher_is_worse``: collapsed above the collapsed bound, warning above the warning bound (mirrored for
    ``norm_entropy``). ``warning_inclusive``: the warning bound itself is a warning (``>=``/``<=``); the
    collapsed bound never is (``>``/``<``).
    """

    metric: str  # the LayerReport attribute
    warning_field: str
    collapsed_field: str
    higher_is_worse: bool = True
    warning_inclusive: bool = False

    def warning(self, t: Thresholds) -> float:
        return float(getattr(t, self.warning_field))

    def collapsed(self, t: Thresholds) -> float:
        return float(getattr(t, self.collapsed_field))

    @property
    def warning_op(self) -> str:
        return (">" if self.higher_is_worse else "<") + ("=" if self.warning_inclusive else "")

    @property
    def collapsed_op(self) -> str:
        return ">" if self.higher_is_worse else "<"

    def judge(self, value: float | None, t: Thresholds, floor: float | None, fair: float) -> tuple[HealthState, str] | None:
        """The metric's state and reason, or None when it is undefined. Noise-aware: a bound inside the
        noise floor (``floor``, None: no floor) is not judged."""
        if value is None:
            return None
        sign = 1.0 if self.higher_is_worse else -1.0  # judge lower-is-worse metrics on the negated scale
        v, warn, collapse = sign * value, sign * self.warning(t), sign * self.collapsed(t)
        f = None if floor is None else sign * floor
        collapse_ok = f is None or f <= collapse
        warn_ok = f is None or (f < warn if self.warning_inclusive else f <= warn)
        if v > collapse and collapse_ok:
            return C, f"{self.metric} {value:.3g} {self.collapsed_op} {self.collapsed(t):g} (collapsed)"
        if not warn_ok:
            assert floor is not None
            return N, _noisy(self.metric, floor, self.warning(t), fair, upper=self.higher_is_worse)
        if v > warn or (self.warning_inclusive and v >= warn):
            return W, f"{self.metric} {value:.3g} {self.warning_op} {self.warning(t):g} (warning)"
        return H, ""


#: Every thresholded metric, in report order.
BOUNDS: tuple[Bound, ...] = (
    Bound("load_cov", "load_cov_warning", "load_cov_collapsed", warning_inclusive=True),
    Bound("dead_ratio", "dead_ratio_warning", "dead_ratio_collapsed"),
    Bound("top2_excess", "top2_excess_warning", "top2_excess_collapsed"),
    Bound("norm_entropy", "entropy_warning", "entropy_collapsed", higher_is_worse=False, warning_inclusive=True),
)


def _noisy(name: str, floor: float, bound: float, fair: float, upper: bool) -> str:
    side = "reaches" if upper else "falls to"
    return (
        f"not enough data: a balanced router's {name} {side} {floor:.3g} by chance at {fair:.3g} assignments/expert, "
        f"not clear of the warning threshold {bound:g}"
    )


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
    faults: OutputFaults | None = None,
) -> Classification:
    """Classify one layer. ``noise`` gives the window's noise floors (``None``: judge every threshold).
    ``min_fair_share`` is the deprecated blanket guard: windows below it are ``insufficient_data``.
    ``faults`` (non-finite outputs, invalid ids) make the layer at least ``warning`` (module docstring)."""
    fault_reasons = faults.reasons() if faults is not None else {}
    fault_states = dict.fromkeys(fault_reasons, W)
    if fair_share <= 0 or fair_share < min_fair_share:
        why = (
            "no assignments in this window"
            if fair_share <= 0
            else f"fair share {fair_share:.3g} assignments/expert < min_fair_share {min_fair_share:g}"
        )
        if fault_reasons:  # broken outputs are no lack of data: say what is broken
            return Classification(W, list(fault_reasons.values()), fault_states, {"window": why})
        return Classification(N, [why], {}, {"window": why})
    values = {"load_cov": load_cov, "dead_ratio": dead_ratio, "top2_excess": top2_excess, "norm_entropy": norm_entropy}
    checks = {
        b.metric: b.judge(values[b.metric], thresholds, noise and getattr(noise, b.metric), fair_share)
        for b in BOUNDS
    }
    judged = {name: c for name, c in checks.items() if c is not None}
    state = worst([*(s for s, _ in judged.values()), *fault_states.values()])
    noisy = {name: r for name, (s, r) in judged.items() if s is N}
    reasons = [*fault_reasons.values(), *(r for s, r in judged.values() if s in (W, C))]
    if state is N:
        reasons = list(noisy.values())
    return Classification(state, reasons, {**{name: s for name, (s, _) in judged.items()}, **fault_states}, noisy)


def worst(states: Iterable[HealthState]) -> HealthState:
    """Worst state; ``insufficient_data`` only when every state is (or there are none)."""
    result = HealthState.INSUFFICIENT_DATA
    for s in states:
        if s.severity > result.severity:
            result = s
    return result
