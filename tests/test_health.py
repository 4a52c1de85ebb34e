"""Health classification boundaries (DESIGN section 3)."""

import pytest

from moewatch.config import Thresholds
from moewatch.health import classify_layer, worst
from moewatch.report import HealthState

H, W, C, INS = (HealthState.HEALTHY, HealthState.WARNING, HealthState.COLLAPSED, HealthState.INSUFFICIENT_DATA)

BASE = dict(load_cov=0.1, dead_ratio=0.0, top2_excess=0.0, norm_entropy=0.99, fair_share=100.0, min_fair_share=32)


def cls(**kw):
    return classify_layer(**{**BASE, **kw}, thresholds=Thresholds())


@pytest.mark.parametrize(
    "metric,value,state",
    [
        ("load_cov", 0.349, H), ("load_cov", 0.35, W), ("load_cov", 1.0, W), ("load_cov", 1.01, C),
        ("dead_ratio", 0.0, H), ("dead_ratio", 0.01, W), ("dead_ratio", 0.10, W), ("dead_ratio", 0.11, C),
        ("top2_excess", 0.03, H), ("top2_excess", 0.031, W), ("top2_excess", 0.38, W), ("top2_excess", 0.381, C),
        ("norm_entropy", 0.851, H), ("norm_entropy", 0.85, W), ("norm_entropy", 0.5, W), ("norm_entropy", 0.499, C),
        ("top2_excess", None, H), ("norm_entropy", None, H),
    ],
)
def test_each_metric_boundary(metric, value, state):
    result = cls(**{metric: value})
    assert result.state is state
    if state is not H:
        assert any(r.startswith(metric) for r in result.reasons)
    else:
        assert result.reasons == []


def test_layer_state_is_worst_metric_and_reasons_list_each():
    result = cls(load_cov=0.5, norm_entropy=0.3)
    assert result.state is C
    assert len(result.reasons) == 2


def test_noise_guard_reports_insufficient_data_even_when_metrics_look_collapsed():
    result = cls(load_cov=1.7, dead_ratio=0.5, fair_share=10.0)
    assert result.state is INS
    assert "min_fair_share" in result.reasons[0]


def test_thresholds_are_configurable():
    t = Thresholds(load_cov_warning=0.1, load_cov_collapsed=0.2)
    assert classify_layer(**{**BASE, "load_cov": 0.15}, thresholds=t).state is W
    assert classify_layer(**{**BASE, "load_cov": 0.25}, thresholds=t).state is C


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError, match="load_cov_warning"):
        Thresholds(load_cov_warning=2.0, load_cov_collapsed=1.0)


def test_worst():
    assert worst([H, W, INS]) is W
    assert worst([H, C, W]) is C
    assert worst([INS, INS]) is INS
    assert worst([]) is INS
