"""Early warning: per layer, where the health metrics are heading (idle windows per expert are kept by
:class:`moewatch.resume.RouterHistory`).

Router collapse is a positive feedback loop, so a layer's imbalance grows exponentially: each metric's
*badness* ``x`` (``load_cov``, ``top2_excess``, ``1 - norm_entropy``; 0 for a perfectly balanced router)
follows ``log x = a + b * step``. :class:`TrendTracker` fits that line over the last ``M`` windows with the
Theil-Sen estimator (median of pairwise slopes: a few noisy windows cannot move it) and projects the step
at which ``x`` reaches the metric's collapsed threshold, i.e. where the log-distance
``log(threshold) - log(x)`` reaches zero.

A projection is made only when the trend is real, which keeps a balanced router from ever projecting:

* at least ``early_warning.min_windows`` windows (2 by default), and at least 75 % of the pairwise slopes
  are positive (a consistent climb, not one outlier);
* the slope exceeds ``min_rate`` per window;
* the latest fitted value is above the window's noise floor (:mod:`moewatch.noise`): a balanced router's
  metrics stay below it in all but ``false_alarm_rate`` of windows, so trends inside the noise are ignored.

``projected_collapse_step`` is the earliest projection over the three metrics (``None`` when none is heading
there, or the layer is already collapsed). The alert engine raises ``projected_collapse`` when it is within
``alerts.projected_collapse_horizon_steps`` of the window's end.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

import numpy as np

from moewatch.report import HealthState, LayerReport, WindowReport
from moewatch.trend_settings import EarlyWarningConfig

__all__ = ["EarlyWarningConfig", "TrendTracker", "projected_crossing", "theil_sen"]


#: Up to this many points (the default history is 8 windows) the fit runs in plain Python: numpy's per-call
#: overhead (triu_indices, three medians) costs several times the work on a few dozen pairs.
_PY_FIT_MAX = 24


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, share of positive pairwise slopes) of the Theil-Sen line through ``(x, y)``."""
    if x.size <= _PY_FIT_MAX:
        return _theil_sen_small(x.tolist(), y.tolist())
    i, j = np.triu_indices(x.size, k=1)
    dx = x[j] - x[i]
    keep = dx != 0
    slopes = (y[j] - y[i])[keep] / dx[keep]
    if slopes.size == 0:
        return 0.0, float(np.median(y)), 0.0
    slope = float(np.median(slopes))
    intercept = float(np.median(y - slope * x))
    return slope, intercept, float((slopes > 0).mean())


def _theil_sen_small(x: list[float], y: list[float]) -> tuple[float, float, float]:
    n = len(x)
    slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(n) for j in range(i + 1, n) if x[j] != x[i]]
    if not slopes:
        return 0.0, statistics.median(y), 0.0
    slope = statistics.median(slopes)
    intercept = statistics.median([b - slope * a for a, b in zip(x, y, strict=True)])
    return slope, intercept, sum(s > 0 for s in slopes) / len(slopes)


def projected_crossing(
    steps: np.ndarray, badness: np.ndarray, threshold: float, floor: float | None, window_steps: float,
    min_rate: float,
) -> int | None:
    """Step at which ``badness`` (positive, growing toward ``threshold``) is projected to reach it, or ``None``."""
    ok = np.isfinite(badness) & (badness > 0)
    if ok.sum() < 2 or threshold <= 0:
        return None
    x, y = steps[ok].astype(np.float64), np.log(badness[ok])
    slope, intercept, positive = theil_sen(x, y)
    if positive < 0.75 or slope * window_steps <= min_rate:
        return None
    now = float(x[-1])
    fitted_now = intercept + slope * now
    if floor is not None and fitted_now <= math.log(max(floor, 1e-12)):
        return None
    if fitted_now >= math.log(threshold):
        return int(now)
    return int(math.ceil((math.log(threshold) - intercept) / slope))


@dataclass
class _LayerHistory:
    steps: deque[int]
    cov: deque[float]
    top2: deque[float]
    ent: deque[float]
    num_experts: int


class TrendTracker:
    """Stateful per-run pass over window reports: adds ``projected_collapse_step``."""

    def __init__(self, config: EarlyWarningConfig, thresholds: object) -> None:
        self.config = config
        self.thresholds = thresholds
        self._layers: dict[int, _LayerHistory] = {}

    def state_dict(self) -> dict[str, object]:
        """JSON-able history (for a training checkpoint): trends survive a resume."""
        return {
            str(i): {"steps": list(h.steps), "cov": list(h.cov), "top2": list(h.top2), "ent": list(h.ent),
                     "num_experts": h.num_experts}
            for i, h in self._layers.items()
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        m = self.config.windows
        self._layers = {}
        for key, raw in state.items():
            d = dict(raw)  # type: ignore[call-overload]
            self._layers[int(key)] = _LayerHistory(
                deque(d["steps"], maxlen=m), deque(d["cov"], maxlen=m), deque(d["top2"], maxlen=m),
                deque(d["ent"], maxlen=m),
                # states before idle windows moved to RouterHistory held them here ("idle")
                int(d["num_experts"]) if "num_experts" in d else len(d.get("idle", [])),
            )

    def update(self, report: WindowReport) -> WindowReport:
        layers = [self._layer(layer, report) for layer in report.layers]
        return report.model_copy(update={"layers": layers})

    def _layer(self, layer: LayerReport, report: WindowReport) -> LayerReport:
        m = self.config.windows
        h = self._layers.get(layer.index)
        if h is None or h.num_experts != layer.num_experts:
            h = _LayerHistory(deque(maxlen=m), deque(maxlen=m), deque(maxlen=m), deque(maxlen=m), layer.num_experts)
            self._layers[layer.index] = h
        update: dict[str, object] = {}
        if not self.config.enabled or layer.assignments <= 0:
            return layer
        h.steps.append(report.step_end)
        h.cov.append(_num(layer.load_cov))
        h.top2.append(_num(layer.top2_excess))
        h.ent.append(_num(None if layer.norm_entropy is None else 1.0 - layer.norm_entropy))
        if layer.state is HealthState.COLLAPSED or len(h.steps) < self.config.min_windows:
            return layer.model_copy(update=update)
        t = self.thresholds
        floors = layer.noise_floor
        ent_floor = floors.get("norm_entropy")
        candidates = {
            "load_cov": (h.cov, t.load_cov_collapsed, floors.get("load_cov")),  # type: ignore[attr-defined]
            "top2_share": (h.top2, t.top2_excess_collapsed, floors.get("top2_excess")),  # type: ignore[attr-defined]
            "norm_entropy": (
                h.ent, 1.0 - t.entropy_collapsed, None if ent_floor is None else 1.0 - ent_floor,  # type: ignore[attr-defined]
            ),
        }
        steps = np.asarray(h.steps, dtype=np.float64)
        best: tuple[int, str] | None = None
        for name, (series, threshold, floor) in candidates.items():
            step = projected_crossing(
                steps, np.asarray(series, dtype=np.float64), threshold, floor, max(report.steps, 1),
                self.config.min_rate,
            )
            if step is not None and (best is None or step < best[0]):
                best = (step, name)
        if best is not None:
            update["projected_collapse_step"], update["projected_collapse_metric"] = best
        return layer.model_copy(update=update)


def _num(v: float | None) -> float:
    return math.nan if v is None else float(v)
