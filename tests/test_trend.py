"""Early warning: robust trend fit, projected collapse on the demo's runaway router, never on a balanced one."""

import numpy as np
import pytest

from moewatch.alerting.engine import AlertEngine
from moewatch.alerting.settings import AlertCondition, AlertsConfig
from moewatch.config import Thresholds
from moewatch.demo.run import DemoOptions, run_demo
from moewatch.health import classify_layer
from moewatch.report import HealthState, LayerReport, WindowReport
from moewatch.trend import EarlyWarningConfig, TrendTracker, projected_crossing, theil_sen

QUIET_ENV = {
    "MOEWATCH_PROMETHEUS__ENABLED": "false",
    "MOEWATCH_ALERTS__ENABLED": "false",
    "MOEWATCH_JSONL__ENABLED": "false",
}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    for k, v in QUIET_ENV.items():
        monkeypatch.setenv(k, v)


def test_theil_sen_ignores_an_outlier():
    x = np.arange(10.0)
    y = 2.0 * x + 1
    y[4] = 100.0
    slope, intercept, positive = theil_sen(x, y)
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(1.0) and positive > 0.8


def test_exponential_growth_projects_its_crossing():
    steps = np.arange(10, 90, 10.0)
    cov = 0.05 * np.exp(0.03 * steps)  # crosses 1.0 at ln(20)/0.03 = 99.86
    assert projected_crossing(steps, cov, 1.0, 0.02, 10, 0.02) == 100
    # the same values shuffled (no trend) or flat inside the noise floor project nothing
    rng = np.random.default_rng(0)
    assert projected_crossing(steps, rng.permutation(cov), 1.0, 0.02, 10, 0.02) is None
    assert projected_crossing(steps, cov, 1.0, 10.0, 10, 0.02) is None


def _layer(step_loads: list[int], cov: float, state: HealthState = HealthState.HEALTHY) -> LayerReport:
    return LayerReport(
        index=0, module="gate", family="test", num_experts=4, top_k=1, tokens=sum(step_loads),
        assignments=sum(step_loads), loads=step_loads, fair_share=sum(step_loads) / 4, load_cov=cov,
        top2_excess=0.0, norm_entropy=0.99, state=state, noise_floor={"load_cov": 0.01},
    )


def _report(w: int, layer: LayerReport) -> WindowReport:
    return WindowReport(run="r", window=w, step_start=10 * w, step_end=10 * (w + 1), time_start=w, time_end=w + 1,
                        tokens=layer.tokens, layers=[layer], state=layer.state)


def test_history_counts_idle_windows_and_skips_windows_that_routed_nothing():
    from types import SimpleNamespace

    from moewatch.resume import RouterHistory

    history = RouterHistory([SimpleNamespace(num_experts=4)])  # type: ignore[list-item]
    idle = []
    for w in range(6):
        loads = [0, 0, 0, 0] if w == 3 else [100, 50, 10 if w < 2 else 0, 40]  # window 3: nothing routed
        idle.append(history.update(_report(w, _layer(loads, 0.1))).layers[0].idle_windows)
    assert idle[2] == [0, 0, 1, 0] and idle[3] == [0, 0, 1, 0]  # the empty window did not count
    assert idle[-1] == [0, 0, 3, 0]
    assert history.state_dict()["dead_streaks"] == [[0, 0, 3, 0]]


def test_tracker_reports_projection():
    tracker = TrendTracker(EarlyWarningConfig(), Thresholds())
    out = []
    for w in range(6):
        loads = [100, 50, 10 if w < 2 else 0, 40]
        out.append(tracker.update(_report(w, _layer(loads, 0.1 * 1.5**w))).layers[0])
    assert out[0].projected_collapse_step is None  # one window: no trend yet
    last = out[-1]
    assert last.projected_collapse_metric == "load_cov"
    # log cov grows ln(1.5) per 10 steps from 0.1 at step 10: reaches 1.0 at step 10 + 10 ln(10)/ln(1.5)
    assert last.projected_collapse_step == pytest.approx(10 + 10 * np.log(10) / np.log(1.5), abs=1)


def _first(reports: list[WindowReport], pred) -> int | None:
    return next((r.step_end for r in reports if pred(r)), None)


def _projected_alert_step(reports: list[WindowReport]) -> int | None:
    engine = AlertEngine(AlertsConfig(conditions=[AlertCondition.PROJECTED_COLLAPSE], log_notifications=False))
    for r in reports:
        n = engine.evaluate(r)
        if n is not None and any(a.status == "firing" for a in n.alerts):
            return r.step_end
    return None


def test_projected_collapse_fires_before_the_demo_collapses():
    """--balance none with one-step windows (64 tokens each): the alert leads the first collapsed window."""
    result = run_demo(DemoOptions(balance="none", window=1, steps=30, console=False, seed=0))
    collapsed = _first(result.reports, lambda r: r.state is HealthState.COLLAPSED)
    fired = _projected_alert_step(result.reports)
    assert collapsed is not None and fired is not None
    lead = collapsed - fired
    print(f"projected_collapse fired at step {fired}, first collapsed at step {collapsed}: lead {lead} steps")
    assert lead >= 1


@pytest.mark.parametrize("seed", [0, 1])
def test_projected_collapse_never_fires_on_a_balanced_demo(seed):
    """Smaller than benchmarks/early_warning.py (2000 steps x 5 seeds): 400 one-step windows per seed."""
    result = run_demo(DemoOptions(balance="bias", window=1, steps=400, console=False, seed=seed))
    assert _projected_alert_step(result.reports) is None
    assert all(la.projected_collapse_step is None for r in result.reports for la in r.layers)


def _legacy_state(layer: LayerReport) -> HealthState:
    """Health as judged before noise-aware health: the blanket min_fair_share=32 guard, every threshold."""
    return classify_layer(
        load_cov=layer.load_cov, dead_ratio=layer.dead_ratio, top2_excess=layer.top2_excess,
        norm_entropy=layer.norm_entropy, fair_share=layer.fair_share, thresholds=Thresholds(), min_fair_share=32,
    ).state


@pytest.mark.parametrize("window", [10, 1])
def test_demo_collapse_is_collapsed_in_the_same_windows_or_earlier(window):
    result = run_demo(DemoOptions(balance="none", window=window, steps=100, console=False, seed=0))
    layers = [la for r in result.reports for la in r.layers]
    legacy = [_legacy_state(la) is HealthState.COLLAPSED for la in layers]
    now = [la.state is HealthState.COLLAPSED for la in layers]
    assert all(n for n, old in zip(now, legacy, strict=True) if old)
    assert any(now)


def test_projected_collapse_alert_says_when_and_which_metric():
    engine = AlertEngine(AlertsConfig(conditions=[AlertCondition.PROJECTED_COLLAPSE], log_notifications=False,
                                      projected_collapse_horizon_steps=100))
    far = _layer([100, 50, 10, 40], 0.5).model_copy(update={"projected_collapse_step": 500,
                                                            "projected_collapse_metric": "load_cov"})
    assert engine.evaluate(_report(0, far)) is None  # 490 steps ahead: beyond the horizon
    near = far.model_copy(update={"projected_collapse_step": 80})
    n = engine.evaluate(_report(1, near))
    assert n is not None and n.alerts[0].status == "firing"
    assert n.alerts[0].name == "MoEWatchProjectedCollapse"
    assert "load_cov projected to reach its collapsed threshold at step 80 (60 steps ahead)" in n.alerts[0].reasons


def test_idle_windows_survive_a_checkpoint_through_the_monitor():
    import json

    import torch

    import moewatch
    from moewatch.demo.model import DemoMoE

    def run(state=None):
        torch.manual_seed(0)
        model = DemoMoE(16, 4, 1, 1)
        with torch.no_grad():
            model.layers[0].gate.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1e4]))  # expert 3 never wins
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        watch = moewatch.attach(model, optimizer=opt, window_steps=1, console={"enabled": False},
                                jsonl={"enabled": False}, prometheus={"enabled": False}, alerts={"enabled": False})
        if state is not None:
            watch.load_state_dict(json.loads(json.dumps(state)))
        for _ in range(3):
            model(torch.randn(32, 16)).sum().backward()
            opt.step()
        out = watch.state_dict(), watch.latest
        watch.close()
        return out

    state, first = run()
    assert first.layers[0].idle_windows[3] == 3 and first.layers[0].idle_windows[0] == 0
    _, resumed = run(state)
    assert resumed.layers[0].idle_windows[3] == 6


def test_small_fit_equals_the_numpy_fit():
    from moewatch import trend

    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 8, trend._PY_FIT_MAX):
        for _ in range(20):
            x = np.sort(rng.integers(0, 50, n)).astype(np.float64)  # repeated x values too
            y = rng.normal(size=n)
            small = trend.theil_sen(x, y)
            trend_max, trend._PY_FIT_MAX = trend._PY_FIT_MAX, 0
            try:
                big = trend.theil_sen(x, y)
            finally:
                trend._PY_FIT_MAX = trend_max
            assert small == pytest.approx(big, rel=1e-12, abs=1e-12)
